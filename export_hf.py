"""Write a model of this project in the Hugging Face `openai-gpt` format, so that `transformers`'
`OpenAIGPTDoubleHeadsModel` / `OpenAIGPTLMHeadModel` `.from_pretrained(dir)` load it and give our
logits (what cannot be carried over is listed in docs/export.md).

    python export_hf.py --model_path save/rocstories/best_params.safetensors --out hf_model/
    python export_hf.py --model_path model/ --out hf_model/        (pre-trained weights, LM only)

Layout: our one embedding matrix holds token, special and position rows (docs/reference.md §1). Hugging Face's
`tokens_embed` gets the token rows followed by the special rows (as its `resize_token_embeddings`
would), `positions_embed` the position rows; the special tokens become added tokens of the
tokenizer with the same ids.
"""

import argparse
import json
import os
import sys

import torch

from model_pytorch import (
    HF_LAYER_PARAMS,
    LAYER_PARAMS,
    DoubleHeadModel,
    MultipleChoiceHead,
    WeightsError,
    _body,
    model_from_checkpoint,
    model_from_pretrained,
)
from tasks import SPECIAL_TOKENS
from text_utils import TextEncoder, VocabularyError


class ExportError(ValueError):
    """The model cannot be written in the Hugging Face format as asked."""


def special_token_names(text_encoder, n_special, special_tokens=None):
    """Names of the n_special rows: those the encoder holds (ids n_vocab ...), else the given ones,
    else train.py's three."""
    held = sorted((i, name) for name, i in text_encoder.encoder.items() if i >= text_encoder.n_vocab)
    names = [name for _, name in held] or list(special_tokens or (SPECIAL_TOKENS if n_special == 3 else ()))
    if len(names) != n_special:
        raise ExportError(f"the model has {n_special} special rows but {len(names)} special token names were "
                          f"found ({names}); give their names in id order (--special_tokens)")
    return names


def hf_state_dict(model, n_token_rows):
    """Our parameters under Hugging Face's names (Conv1D weights need no transpose: both are [nx, nf])."""
    body = _body(model)
    we = body.embed.weight.detach()
    state = {"transformer.tokens_embed.weight": we[:n_token_rows],
             "transformer.positions_embed.weight": we[n_token_rows:]}
    for i, block in enumerate(body.h):
        for ours, theirs in zip(LAYER_PARAMS, HF_LAYER_PARAMS):
            state[f"transformer.h.{i}.{theirs}"] = block.get_parameter(ours).detach()
    if isinstance(model, DoubleHeadModel):
        state["multiple_choice_head.summary.weight"] = model.task_head.linear.weight.detach()
        state["multiple_choice_head.summary.bias"] = model.task_head.linear.bias.detach()
    return {name: t.to("cpu", torch.float32).contiguous().clone() for name, t in state.items()}


def hf_config(model, n_token_rows):
    body = _body(model)
    cfg = body.cfg
    is_double = isinstance(model, DoubleHeadModel)
    return {
        "model_type": "openai-gpt",
        "architectures": ["OpenAIGPTDoubleHeadsModel" if is_double else "OpenAIGPTLMHeadModel"],
        "vocab_size": n_token_rows, "n_positions": body.n_ctx, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "afn": cfg.afn,  # transformers' "gelu" for openai-gpt is the tanh form, as ours
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop, "resid_pdrop": cfg.resid_pdrop,
        "summary_type": "cls_index", "summary_use_proj": True, "summary_activation": None,
        "summary_proj_to_labels": True, "summary_first_dropout": cfg.clf_pdrop,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def write_tokenizer(text_encoder, special_names, out_dir, n_ctx):
    """vocab.json and merges.txt (the base vocabulary, as OpenAI's files), the specials as added tokens."""
    n_vocab = text_encoder.n_vocab
    base = sorted(((i, piece) for piece, i in text_encoder.encoder.items() if i < n_vocab))
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({piece: i for i, piece in base}, f, ensure_ascii=False)
    merges = sorted(text_encoder.bpe_ranks, key=text_encoder.bpe_ranks.get)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    unknown = base[0][1]  # id 0, what an unknown piece becomes (docs/reference.md §4)
    specials = {name: n_vocab + k for k, name in enumerate(special_names)}
    added = {str(i): dict(content=name, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
             for name, i in specials.items()}
    files = {
        "tokenizer_config.json": dict(tokenizer_class="OpenAIGPTTokenizer", unk_token=unknown, model_max_length=n_ctx,
                                      additional_special_tokens=special_names, added_tokens_decoder=added,
                                      clean_up_tokenization_spaces=False),
        "special_tokens_map.json": dict(unk_token=unknown, additional_special_tokens=special_names),
        "added_tokens.json": specials,
    }
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)


def save_hf_checkpoint(model, text_encoder, out_dir, special_tokens=None):
    """Write `model` (DoubleHeadModel with a multiple-choice head, LMModel or TransformerModel) and
    its vocabulary to `out_dir` as config.json, model.safetensors, vocab.json, merges.txt and the
    tokenizer's special-token files. Returns out_dir.

    For `OpenAIGPTDoubleHeadsModel`, set mc_token_ids to the index of the FIRST `_classify_` token
    of each sequence: that is where our classifier reads the hidden state.
    """
    from safetensors.torch import save_file

    body = _body(model)
    if isinstance(model, DoubleHeadModel) and type(model.task_head) is not MultipleChoiceHead:
        raise ExportError(f"transformers' OpenAIGPTDoubleHeadsModel has a multiple-choice head only; this model's "
                          f"task head is {type(model.task_head).__name__}. Export its language model instead: "
                          "export_hf.py --lm_only, or save_hf_checkpoint(model.transformer, ...)")
    n_vocab, rows = text_encoder.n_vocab, body.embed.weight.size(0)
    n_special = rows - n_vocab - body.n_ctx
    if n_special < 0:
        raise ExportError(f"the model's embedding has {rows} rows, fewer than the vocabulary's {n_vocab} tokens + "
                          f"n_ctx={body.n_ctx} positions: the vocabulary does not belong to this model")
    names = special_token_names(text_encoder, n_special, special_tokens)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model, n_vocab + n_special), f, indent=2)
    save_file(hf_state_dict(model, n_vocab + n_special), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer(text_encoder, names, out_dir, body.n_ctx)
    return out_dir


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Export a GPT-1 model of this project in the Hugging Face format.")
    p.add_argument("--model_path", default="model/",
                   help="a checkpoint file (best_params.safetensors, checkpoint.pt) or a weights folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--encoder_path", default="model/encoder_bpe_40000.json")
    p.add_argument("--bpe_path", default="model/vocab_40000.bpe")
    p.add_argument("--n_special", type=int, default=None,
                   help="special rows of a checkpoint file (default: as its run records: 0 for --dataset lm, else 3)")
    p.add_argument("--n_head", type=int, default=None, help="default: as recorded, else 12 (GPT-1)")
    p.add_argument("--special_tokens", nargs="*", default=None, help="names of the special rows, in id order")
    p.add_argument("--lm_only", action="store_true", help="leave out the task head of a fine-tuned checkpoint")
    return p


def load_for_export(args, n_vocab):
    if os.path.isdir(args.model_path):
        return model_from_pretrained(args.model_path, args.n_head)
    head = None if args.lm_only else "auto"
    return model_from_checkpoint(args.model_path, n_vocab, args.n_special, args.n_head, task_head_type=head)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        text_encoder = TextEncoder(args.encoder_path, args.bpe_path)
        model = load_for_export(args, text_encoder.n_vocab)
        save_hf_checkpoint(model, text_encoder, args.out, args.special_tokens)
    except (ExportError, WeightsError, VocabularyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {type(model).__name__} as Hugging Face {hf_config(model, 0)['architectures'][0]} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
