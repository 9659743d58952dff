"""Accuracy of a quantized artifact, measured at compile time and written into its manifest.

On a fixed prompt set (seeded token ids), the artifact runs teacher-forced token by token and each
position's distribution is compared with the float model's (the transformers model we compiled,
full precision): per-token KL(float ‖ quantized) and top-1 agreement. Per-weight reconstruction
error (relative Frobenius norm) comes from the packager.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPTS = 4
PROMPT_LEN = 16
SEED = 1234


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure(model, folder: Path, vocab_size: int) -> dict:
    import torch

    from ..runtime import Session

    rng = np.random.default_rng(SEED)
    session = Session(folder, verify=False)  # just written by us; the runtime verifies on every load
    kls, agree = [], []
    for _ in range(PROMPTS):
        ids = [int(i) for i in rng.integers(3, vocab_size, PROMPT_LEN)]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(PROMPT_LEN)[None],
                        use_cache=False).logits[0].float().numpy()  # [T, V]
        session.reset()
        ours = np.stack([session.forward([t]) for t in ids])  # [T, V], teacher-forced
        p_log, q_log = _log_softmax(ref), _log_softmax(ours)
        kls.extend((np.exp(p_log) * (p_log - q_log)).sum(-1).tolist())
        agree.extend((ref.argmax(-1) == ours.argmax(-1)).tolist())
    return {"prompts": PROMPTS, "tokens_per_prompt": PROMPT_LEN, "seed": SEED,
            "kl_mean": float(np.mean(kls)), "kl_max": float(np.max(kls)),
            "top1_agreement": float(np.mean(agree))}
