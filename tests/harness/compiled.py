"""Compiled against eager: the same training steps on two models with the same weights."""

from __future__ import annotations

import torch


def assert_steps_match(eager, compiled, x_BS: torch.Tensor, y_BS: torch.Tensor, steps: int = 2) -> None:
    """`steps` forward/backward passes of both models (from the second on, compiled graphs come
    from the cache): logits, LM and aux losses and every gradient equal within fp32 tolerance."""
    for _ in range(steps):
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(x_BS, y_BS)
            out.loss.backward()
            outs.append(out)
        torch.testing.assert_close(outs[1].logits_BSV, outs[0].logits_BSV, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[1].lm_loss, outs[0].lm_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[1].aux_loss, outs[0].aux_loss, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
