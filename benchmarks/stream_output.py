"""Host cost of a streamed sample's partial outputs (`rollout.output.format_output`): rebuilt whole every token
(text decoded from the first token, every logprob tuple made again) against built incrementally
(`partial=True`: the new tokens decoded with the last emitted chunk, the tuples extended; a copy of the list handed
out). One sample streamed token by token to L tokens with logprobs, through a byte-level BPE tokenizer (the GPT-2 /
DeepSeek pre-tokenizer and decoder; a multi-byte character spans several tokens). Reported: microseconds per
partial output at a few lengths, and the total for the whole stream. CPU only (no model, no device).

    python benchmarks/stream_output.py [--lengths 256 1024 4096] [--out NAME]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from mxroll.model.tokenizer import HFTokenizer, byte_level_bpe  # noqa: E402
from mxroll.rollout.output import Record, format_output  # noqa: E402
from mxroll.rollout.request import Group, Sequence  # noqa: E402
from mxroll.rollout.sampling_params import SamplingParams  # noqa: E402


def stream(tok, L: int, partial: bool, probes: set[int]) -> tuple[float, dict[int, float]]:
    rng = random.Random(0)
    words = ["hello", " world", " é", "ça", " 数据", "模型", " 🚀", "!", "\n", " the", " of"]
    outs = tok.encode("".join(rng.choice(words) for _ in range(L)))[:L]
    prompt = [5, 6, 7]
    group = Group("r", prompt, SamplingParams(max_new_tokens=L), [0], 0)
    seq = Sequence(0, group, 0, list(prompt), len(prompt))
    group.seqs.append(seq)
    rec = Record(return_logprob=True)
    total, at = 0.0, {}
    for i, t in enumerate(outs):
        seq.tokens.append(t)
        rec.add_token(-rng.random(), None, "default", i)
        t0 = time.perf_counter()
        format_output(seq, rec, tok, "default", partial=partial)
        dt = time.perf_counter() - t0
        total += dt
        if i + 1 in probes:
            at[i + 1] = 1e6 * dt
    return total, at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--out", default="stream_output")
    args = ap.parse_args()
    tok = HFTokenizer.of(byte_level_bpe())
    L = max(args.lengths)
    probes = set(args.lengths)
    rows = {}
    for name, partial in (("whole", False), ("incremental", True)):
        stream(tok, 64, partial, set())  # warm-up
        total, at = stream(tok, L, partial, probes)
        rows[name] = {"total_s": total, "us_per_output_at_length": at}
    print(f"{'build':>12} " + " ".join(f"{'us @' + str(n):>10}" for n in sorted(probes)) + f" {'stream total s':>15}")
    for name, r in rows.items():
        print(f"{name:>12} " + " ".join(f"{r['us_per_output_at_length'][n]:>10.1f}" for n in sorted(probes))
              + f" {r['total_s']:>15.3f}")
    env = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"results -> {write_results(args.out, {'env': env, 'length': L, 'rows': rows})}")


if __name__ == "__main__":
    main()
