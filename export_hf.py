"""Write a model of this project in the Hugging Face `openai-gpt` format, so that `transformers`'
`OpenAIGPTDoubleHeadsModel` / `OpenAIGPTLMHeadModel` `.from_pretrained(dir)` load it and give our
logits (what maps where, and what cannot be carried over: docs/export.md).

    python export_hf.py --model_path save/rocstories/best_params.safetensors --out hf_model/
    python export_hf.py --model_path model/ --out hf_model/        (pre-trained weights, LM only)
    python export_hf.py --demo --out hf_model/                      (the demo's fine-tune: no download)

A file of train.py records what rebuilds its model and its vocabulary: no size flags. The writing
itself is weights.save_hf_checkpoint (also importable from here).
"""

import argparse
import sys

from checkpoints import load_with_vocabulary
from synthetic import demo_files
from text_utils import VocabularyError
from utils import WriteError
from weights import ExportError, WeightsError, save_hf_checkpoint  # noqa: F401  (the library entry)


def build_parser():
    p = argparse.ArgumentParser(description="Export a GPT-1 model of this project in the Hugging Face format.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", default="model/",
                   help="a checkpoint file (best_params.safetensors, checkpoint.pt) or a weights folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--encoder_path", default=None,
                   help="the BPE vocabulary (default: the run's for a file of train.py, else "
                        "model/encoder_bpe_40000.json)")
    p.add_argument("--bpe_path", default=None, help="the BPE merges (default: as --encoder_path)")
    p.add_argument("--n_special", type=int, default=None,
                   help="special rows, for a checkpoint file that does not record them (default: 3, or 0 after "
                        "--dataset lm)")
    p.add_argument("--n_head", type=int, default=None, help="heads, for weights that do not record it (default 12)")
    p.add_argument("--special_tokens", nargs="*", default=None, help="names of the special rows, in id order")
    p.add_argument("--lm_only", action="store_true", help="leave out the task head of a fine-tuned checkpoint")
    p.add_argument("--demo", action="store_true",
                   help="export the demo's fine-tune (else its random pre-trained weights), written if absent")
    p.add_argument("--demo_dir", default="demo_run/", help="the demo's folder")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    model_path, encoder_path, bpe_path, n_head = args.model_path, args.encoder_path, args.bpe_path, args.n_head
    try:
        if args.demo:
            model_path, encoder_path, bpe_path, demo_heads = demo_files(args.demo_dir)
            n_head = n_head or demo_heads
        model, spec, text_encoder = load_with_vocabulary(model_path, encoder_path, bpe_path,
                                                         head=None if args.lm_only else "auto", n_head=n_head,
                                                         n_special=args.n_special)
        save_hf_checkpoint(model, text_encoder, args.out, args.special_tokens or spec.special_tokens or None)
    except (ExportError, WeightsError, VocabularyError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    kind = "OpenAIGPTDoubleHeadsModel" if hasattr(model, "task_head") else "OpenAIGPTLMHeadModel"
    print(f"wrote {type(model).__name__} as Hugging Face {kind} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
