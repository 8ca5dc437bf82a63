"""Sample continuations of text prompts from GPT-1's language model, with a key/value cache.

    python generate.py --prompt "the dog ran to the"                       (weights and vocabulary in model/)
    python generate.py --prompt "a" --prompt "b c" --top_p 0.9 --seed 1    (several prompts, one batch)
    python generate.py --model_path save/rocstories/best_params.safetensors --prompt "..."   (fine-tuned)
    python generate.py --demo --prompt "tom was sad ."                     (the demo's files: no download)

Prompts are encoded as the original does (text_utils.TextEncoder) and continuations decoded back
to text (lower-cased BPE, spaces around punctuation). Special and position rows of the embedding
never come out as tokens; a prompt plus --max_new_tokens must fit in the model's n_ctx. A file of
train.py records what rebuilds its model and which vocabulary it was trained with: no size flags.
"""

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batches import resolve_device
from checkpoints import load_with_vocabulary
from model_pytorch import KVCache, body_of
from synthetic import demo_files
from text_utils import VocabularyError
from weights import WeightsError


class GenerationError(ValueError):
    """Prompts or settings that generation cannot honour."""


@dataclass
class Generation:
    """What `generate` returns: the new token ids of each prompt (ending with the stop token
    where one was produced) and, with return_logits, the raw LM logits over every row of the
    embedding before each choice, [n_prompts, n_steps, rows] (steps after a stop are filler)."""

    tokens: list
    logits: torch.Tensor = None


def next_token_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution the next token is drawn from: softmax(logits / temperature) kept to the
    top_k largest logits (ties with the k-th kept too; 0: all), then to the smallest set of most
    likely tokens whose probability reaches top_p (1: all), renormalised."""
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.softmax(logits, dim=-1)


def choose_next(logits, greedy, temperature, top_k, top_p, generator):
    if greedy:
        return logits.argmax(-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_generation_args(prompts, rows, n_vocab, n_ctx, max_new_tokens, greedy, temperature, top_k, top_p,
                           stop_token):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token id lists")
    if not 0 < n_vocab <= rows - n_ctx:
        raise GenerationError(f"n_vocab={n_vocab} but the embedding has {rows} rows, {n_ctx} of them positions")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise GenerationError(f"temperature must be > 0 (or use greedy decoding), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"top_k must be >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if stop_token is not None and not 0 <= stop_token < n_vocab:
        raise GenerationError(f"stop_token {stop_token} is not a token id (0 ... {n_vocab - 1})")
    n_token_rows = rows - n_ctx  # token and special rows may be given; position rows may not
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < n_token_rows]
        if bad:
            raise GenerationError(f"prompt {i} holds id {bad[0]}, outside the token and special rows 0 ... "
                                  f"{n_token_rows - 1}")
        if len(prompt) + max_new_tokens > n_ctx:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} it would reach "
                f"{len(prompt) + max_new_tokens} positions but the model has n_ctx={n_ctx}; shorten the prompt "
                f"or ask for at most {max(n_ctx - len(prompt), 0)} new tokens")


def _with_positions(body, tokens, positions):
    """Ids [B, T, 2]: the tokens and their position rows (n_vocab + n_special + p)."""
    first_position_row = body.embed.weight.size(0) - body.n_ctx
    return torch.stack([tokens, first_position_row + positions], dim=-1)


def _last_states(body, tokens, lengths, cache=None, positions=None):
    """Hidden state at the last real position of each sequence: the new positions given the cache,
    or the whole prefix again (the uncached baseline; right padding is exact under causal attention)."""
    if positions is None:
        positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    h = body(_with_positions(body, tokens, positions), body.embed.weight, cache=cache)
    return h[torch.arange(h.size(0), device=h.device), lengths - 1 - positions[:, 0]]


@torch.no_grad()
def generate(model, prompts, n_vocab, max_new_tokens=20, greedy=False, temperature=1.0, top_k=0, top_p=1.0,
             seed=None, stop_token=None, use_cache=True, return_logits=False):
    """Continue each prompt (a list of token ids) of `model` (LMModel, DoubleHeadModel or
    TransformerModel) with the tied LM head.

    Only token rows 0 ... n_vocab-1 may come out: special and position rows are masked. Each
    prompt plus max_new_tokens must fit in n_ctx (an error says by how much it does not; there is
    no sliding window, as positions beyond n_ctx have no embedding). greedy takes the most likely
    token; otherwise tokens are drawn from `next_token_probs`, reproducibly when `seed` is given.
    A sequence ends at `stop_token` (kept in its output); all stop when every one has.
    use_cache=False re-runs the whole prefix for every token (the baseline: same results).
    """
    body = body_of(model)
    we = body.embed.weight
    _check_generation_args(prompts, we.size(0), n_vocab, body.n_ctx, max_new_tokens, greedy, temperature, top_k,
                           top_p, stop_token)
    device = we.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    P = int(lengths.max())
    buffer = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        buffer[i, :len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    rows = torch.arange(B, device=device)
    cfg = body.cfg
    cache = KVCache(len(body.h), B, buffer.size(1), cfg.n_head, cfg.n_embd // cfg.n_head, we) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        h_last = _last_states(body, buffer[:, :P], lengths, cache)
        steps, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = F.linear(h_last, we)
            if return_logits:
                steps.append(logits)
            logits = logits.clone()
            logits[:, n_vocab:] = float("-inf")  # never a special or position row
            token = choose_next(logits, greedy, temperature, top_k, top_p, generator)
            buffer[rows, lengths] = token
            lengths = lengths + 1
            if stop_token is not None:
                done |= token == stop_token
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if use_cache:  # the new token alone, at its position
                h_last = _last_states(body, token[:, None], lengths, cache, (lengths - 1)[:, None])
            else:
                h_last = _last_states(body, buffer[:, :int(lengths.max())], lengths)
    finally:
        model.train(was_training)
    tokens = [_until_stop(buffer[i, len(p):int(lengths[i])].tolist(), stop_token) for i, p in enumerate(prompts)]
    return Generation(tokens, torch.stack(steps, dim=1) if return_logits and steps else None)


def _until_stop(tokens, stop_token):
    return tokens[:tokens.index(stop_token) + 1] if stop_token in tokens else tokens


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Generate text with GPT-1 (KV-cached sampling).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch of prompts")
    p.add_argument("--model_path", default="model/",
                   help="a weights folder (OpenAI shards or Hugging Face format) or a checkpoint file of train.py")
    p.add_argument("--encoder_path", default=None,
                   help="the BPE vocabulary (default: the run's for a file of train.py, else "
                        "model/encoder_bpe_40000.json)")
    p.add_argument("--bpe_path", default=None, help="the BPE merges (default: as --encoder_path)")
    p.add_argument("--max_new_tokens", type=int, default=40, help="tokens to add to each prompt")
    p.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits before sampling")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the most likely tokens up to this mass")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", default=None, help="text of one token that ends a continuation (e.g. '.')")
    p.add_argument("--n_head", type=int, default=None, help="heads, for weights that do not record it (default 12)")
    p.add_argument("--n_special", type=int, default=None,
                   help="special rows, for a checkpoint file that does not record them (default: 3, or 0 after "
                        "--dataset lm)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if present)")
    p.add_argument("--demo", action="store_true", help="use the files of `python train.py --demo` (written if absent)")
    p.add_argument("--demo_dir", default="demo_run/", help="the demo's folder")
    return p


def stop_token_id(text_encoder, text):
    if text is None:
        return None
    ids = text_encoder.encode([text], verbose=False)[0]
    if len(ids) != 1:
        raise GenerationError(f"--stop {text!r} encodes to {len(ids)} tokens {ids}; give the text of exactly one token")
    return ids[0]


def run(args):
    model_path, encoder_path, bpe_path, n_head = args.model_path, args.encoder_path, args.bpe_path, args.n_head
    if args.demo:
        model_path, encoder_path, bpe_path, demo_heads = demo_files(args.demo_dir)
        n_head = n_head or demo_heads
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    model, _, text_encoder = load_with_vocabulary(model_path, encoder_path, bpe_path, n_head=n_head,
                                                  n_special=args.n_special)
    prompts = text_encoder.encode(args.prompt, verbose=False)
    out = generate(model.to(device), prompts, text_encoder.n_vocab, max_new_tokens=args.max_new_tokens,
                   greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop_token=stop_token_id(text_encoder, args.stop))
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
