"""Speech decoder cost vs answer length: incremental (KV cache) vs the reference's full re-run.

The reference runs the CTC decoder over every hidden state so far at each generated token, so its
per-token cost grows with the answer; ours runs only the new token's `upsample_factor` positions
against a key/value cache. For each answer length N we report:

- decoder positions processed for N tokens: 25 N (incremental) vs 25 N (N + 1) / 2 (full re-run);
- per-token time at token N: one incremental step with (N - 1) tokens cached, and one full run
  over N tokens (the reference's step N);
- total decoder time for N tokens: incremental measured directly (N real streaming steps); the full
  re-run integrated (trapezoid) over its per-step times at sampled lengths, because running it N
  times is hours at the larger shapes.

Shapes: `fixture` (the test model's decoder, (2,64,4,128), hidden 64) and `mid` ((2,1024,16,4096),
hidden 1024). `--published` adds the released (2,4096,32,11008), hidden 4096: per-token times only,
the full re-run at its shortest lengths (one full run over 512 tokens is minutes on 2 CPU cores).
Caches for the per-token figures are filled with random keys and values (time does not depend on them).
"""

from __future__ import annotations

import itertools
import json

from _common import FIXTURE_MODEL, emit_json, machine_note, median, parse_args, print_table, timed

import torch

from omni_serve.model.loader import dtype_name, pick_dtype

LENGTHS = (64, 128, 256, 512)
DECODERS = {
    "fixture": {"hidden": 64, "decoder": "(2,64,4,128)"},
    "mid": {"hidden": 1024, "decoder": "(2,1024,16,4096)"},
    "published": {"hidden": 4096, "decoder": "(2,4096,32,11008)"},
}


def build_decoder(name: str, seed: int = 0):
    from omni_serve.model.config import OmniConfig
    from omni_serve.model.ctc_generator import CTCSpeechGenerator

    raw = json.loads((FIXTURE_MODEL / "config.json").read_text())
    if name == "fixture":
        from omni_serve.model.loader import load_model

        return load_model(FIXTURE_MODEL, device=str(torch.get_default_device()),
                          dtype=dtype_name(torch.get_default_dtype())).network.speech_generator
    spec = DECODERS[name]
    raw.update(hidden_size=spec["hidden"], ctc_decoder_config=spec["decoder"], max_position_embeddings=131072)
    config = OmniConfig.from_dict(raw)
    torch.manual_seed(seed)
    generator = CTCSpeechGenerator(spec["hidden"], config.ctc_layer_config(), config.ctc_upsample_factor,
                                   config.unit_vocab_size)
    with torch.no_grad():
        for param in generator.parameters():
            if param.dim() > 1:
                param.normal_(0, 1 / param.shape[1] ** 0.5)
    return generator.eval()


def filled_cache(generator, positions: int):
    """A decoder cache holding `positions` random keys and values in every layer."""
    from omni_serve.model.ctc_generator import DecoderCache

    cache = DecoderCache()
    if positions:
        attention = generator.layers[0].self_attn
        shape = (1, attention.heads, positions, attention.head_dim)
        for layer in range(len(generator.layers)):
            cache.extend(layer, torch.randn(shape), torch.randn(shape))
        cache.length = positions
    return cache


def incremental_step(generator, tokens_before: int, repeats: int) -> float:
    """Median seconds of one incremental step with `tokens_before` tokens already cached."""
    hidden = torch.randn(1, 1, generator.input_proj.in_features)
    cache = filled_cache(generator, tokens_before * generator.upsample_factor)
    length = cache.length

    def step() -> None:
        generator(hidden, cache)
        cache.length = length  # the next repeat overwrites the same positions

    return median(timed(step, repeats, warmup=1))  # the warm-up also grows the buffers once


def full_step(generator, tokens: int, repeats: int) -> float:
    """Median seconds of the reference's step `tokens`: the whole decoder over all hidden states so far."""
    hidden = torch.randn(1, tokens, generator.input_proj.in_features)
    return median(timed(lambda: generator(hidden), repeats, warmup=1 if tokens <= 32 else 0))


def incremental_total(generator, tokens: int) -> float:
    """Seconds for `tokens` real streaming steps (the engine's path)."""
    from omni_serve.model.ctc_generator import DecoderCache

    hidden = torch.randn(tokens, 1, 1, generator.input_proj.in_features)
    cache = DecoderCache()
    return timed(lambda: [generator(hidden[i], cache) for i in range(tokens)], 1, warmup=0)[0]


def trapezoid(points: dict[int, float], upto: int) -> float:
    """Sum of per-step costs for steps 1..upto, linearly interpolated between measured lengths."""
    xs = sorted(n for n in points if n <= upto)
    total = 0.0
    for a, b in itertools.pairwise(xs):
        # steps a+1..b: interpolate linearly between the costs at a and b
        count = b - a
        total += count * (points[a] + points[b]) / 2 + (points[b] - points[a]) / 2
    return total + points[xs[0]]


def measure(name: str, lengths: tuple[int, ...], repeats: int, full_upto: int, quick: bool) -> dict:
    generator = build_decoder(name)
    factor = generator.upsample_factor
    grid = (32, 64, 128, 256) if quick else (16, 32, 64, 96, 128, 192, 256, 384, 512)
    samples = sorted({1, *[n for n in grid if n <= min(max(lengths), full_upto)]})
    full = {n: full_step(generator, n, repeats if n <= 128 and not (quick and n >= 64) else max(1, repeats // 2))
            for n in samples}
    rows = []
    for tokens in lengths:
        per_token_inc = incremental_step(generator, tokens - 1, repeats)
        inc_total = incremental_total(generator, tokens) if name != "published" else None
        row = {"tokens": tokens, "positions_incremental": factor * tokens,
               "positions_full": factor * tokens * (tokens + 1) // 2,
               "per_token_incremental_ms": 1e3 * per_token_inc,
               "per_token_full_ms": 1e3 * full[tokens] if tokens in full else None,
               "total_incremental_s": inc_total,
               "total_full_s": trapezoid(full, tokens) if tokens <= max(samples) else None}
        row["positions_ratio"] = row["positions_full"] / row["positions_incremental"]
        if row["total_full_s"] and inc_total:
            row["time_ratio"] = row["total_full_s"] / inc_total
        rows.append(row)
    return {"decoder": DECODERS[name]["decoder"], "hidden": DECODERS[name]["hidden"], "rows": rows,
            "full_step_ms": {n: 1e3 * t for n, t in full.items()}}


def main() -> None:
    args = parse_args("speech decoder cost vs answer length", lambda p: p.add_argument(
        "--published", action="store_true", help="also the released decoder shape (slow: minutes)"), devices=True)
    torch.set_default_device(args.device)  # every decoder and random tensor below is made there
    torch.set_default_dtype(pick_dtype(torch.device(args.device), args.dtype))
    repeats = args.repeats or (2 if args.quick else 5)
    if args.quick:  # the goal at 256 tokens on the fixture shape; the mid shape up to 128 only
        plan = [("fixture", (64, 128, 256), 256), ("mid", (64, 128), 128)]
    else:
        plan = [("fixture", LENGTHS, 512), ("mid", LENGTHS, 512)]
    if args.published:
        plan.append(("published", LENGTHS, 64))
    results = {name: measure(name, lengths, repeats, upto, args.quick) for name, lengths, upto in plan}
    at256 = {name: next((r for r in res["rows"] if r["tokens"] == 256), None) for name, res in results.items()}
    goals = {name: {"positions_ratio_at_256": r["positions_ratio"], "time_ratio_at_256": r.get("time_ratio"),
                    "positions_goal_met": r["positions_ratio"] >= 100,
                    "time_goal_met": r["time_ratio"] >= 10 if r.get("time_ratio") else None}
             for name, r in at256.items() if r}
    if args.json:
        emit_json({"bench": "decoder_cost", "note": machine_note(), "repeats": repeats, "results": results, "goals": goals})
        return
    print(f"Speech decoder cost: incremental (KV cache) vs full re-run each step. {machine_note()}")
    for name, res in results.items():
        rows = [[r["tokens"], r["positions_incremental"], r["positions_full"], r["positions_ratio"],
                 r["per_token_incremental_ms"], r["per_token_full_ms"] if r["per_token_full_ms"] is not None else "-",
                 r["total_incremental_s"] if r["total_incremental_s"] is not None else "-",
                 r["total_full_s"] if r["total_full_s"] is not None else "-", r.get("time_ratio", "-")]
                for r in res["rows"]]
        print_table(f"{name}: decoder {res['decoder']}, LLM hidden {res['hidden']}",
                    ["tokens", "pos inc", "pos full", "pos ratio", "ms/token inc", "ms/token full",
                     "total s inc", "total s full*", "time ratio"], rows)
    print("\n* full re-run total integrated from its per-step times at", ", ".join(
        f"{name}: {sorted(res['full_step_ms'])}" for name, res in results.items()))
    for name, goal in goals.items():
        met = {True: "met", False: "MISSED", None: "not measured at this shape"}
        time_ratio = goal["time_ratio_at_256"] or float("nan")
        print(f"goal at 256 tokens ({name}): positions {goal['positions_ratio_at_256']:.1f}x (>= 100x: "
              f"{met[goal['positions_goal_met']]}), decoder time {time_ratio:.1f}x "
              f"(>= 10x: {met[goal['time_goal_met']]})")


if __name__ == "__main__":
    main()
