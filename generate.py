"""Sample continuations of text prompts from GPT-1's language model, with a key/value cache.

    python generate.py --prompt "the dog ran to the"                       (weights and vocabulary in model/)
    python generate.py --prompt "a" --prompt "b c" --top_p 0.9 --seed 1    (several prompts, one batch)
    python generate.py --model_path save/rocstories/best_params.safetensors --prompt "..."   (fine-tuned)
    python generate.py --demo --prompt "tom was sad ."                     (the demo's files: no download)

Prompts are encoded as the original does (text_utils.TextEncoder) and continuations decoded back
to text (lower-cased BPE, spaces around punctuation). Special and position rows of the embedding
never come out as tokens; a prompt plus --max_new_tokens must fit in the model's n_ctx.
"""

import argparse
import os
import sys

from model_pytorch import GenerationError, WeightsError, generate, load_lm, resolve_device
from text_utils import TextEncoder, VocabularyError


def build_parser():
    p = argparse.ArgumentParser(description="Generate text with GPT-1 (KV-cached sampling).")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch of prompts")
    p.add_argument("--model_path", default="model/",
                   help="a weights folder (OpenAI shards or Hugging Face format) or a checkpoint file of train.py")
    p.add_argument("--encoder_path", default="model/encoder_bpe_40000.json")
    p.add_argument("--bpe_path", default="model/vocab_40000.bpe")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the most likely tokens up to this mass")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", default=None, help="text of one token that ends a continuation (e.g. '.')")
    p.add_argument("--n_head", type=int, default=None, help="heads, when the weights do not record it (default 12)")
    p.add_argument("--n_special", type=int, default=None,
                   help="special rows of a checkpoint file (default: as its run records: 0 for --dataset lm, else 3)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if present)")
    p.add_argument("--demo", action="store_true", help="use the files of `python train.py --demo` (written if absent)")
    p.add_argument("--demo_dir", default="demo_run/")
    return p


def use_demo_files(args):
    """Point at the demo's vocabulary and its fine-tuned (else random pre-trained) weights; write
    the demo's vocabulary and weights first if they are absent (no training, no download)."""
    import train

    demo = train.parse_args(["--demo", "--demo_dir", args.demo_dir])
    if not os.path.exists(demo.encoder_path) or not os.path.exists(demo.model_path):
        train.prepare_demo(demo)
    best = os.path.join(demo.save_dir, demo.desc, "best_params.safetensors")
    args.model_path = best if os.path.exists(best) else demo.model_path
    args.encoder_path, args.bpe_path = demo.encoder_path, demo.bpe_path
    args.n_head = args.n_head or demo.n_head
    return args


def stop_token_id(text_encoder, text):
    if text is None:
        return None
    ids = text_encoder.encode([text], verbose=False)[0]
    if len(ids) != 1:
        raise GenerationError(f"--stop {text!r} encodes to {len(ids)} tokens {ids}; give the text of exactly one token")
    return ids[0]


def run(args):
    if args.demo:
        use_demo_files(args)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    text_encoder = TextEncoder(args.encoder_path, args.bpe_path)
    n_vocab = text_encoder.n_vocab
    model = load_lm(args.model_path, n_vocab, n_head=args.n_head, n_special=args.n_special).to(device)
    token_rows = model.transformer.embed.weight.size(0) - model.transformer.n_ctx
    if token_rows < n_vocab:
        raise WeightsError(f"the weights in {args.model_path} have {token_rows} token rows but the vocabulary "
                           f"{args.encoder_path} has {n_vocab} entries: they do not belong together")
    prompts = text_encoder.encode(args.prompt, verbose=False)
    out = generate(model, prompts, n_vocab, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   stop_token=stop_token_id(text_encoder, args.stop))
    return [text_encoder.decode(tokens) for tokens in out.tokens]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        continuations = run(args)
    except (GenerationError, WeightsError, VocabularyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for prompt, continuation in zip(args.prompt, continuations):
        print(f"{prompt} >>> {continuation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
