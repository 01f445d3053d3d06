"""Knowledge distillation from the FP model during quantization-aware retraining.

The low-bit student learns from the FP teacher's next-token distributions as well as from the
one-hot targets: ``loss = (1 - w) * CE(student, targets) + w * T^2 * KL(P_teacher^T || P_student^T)``,
``P^T`` the softmax at temperature ``T`` (Hinton et al. 2015; the ``T^2`` keeps the gradient
scale independent of ``T``). The teacher's distribution carries what the FP model learned about
every word, not only the observed one, which regularises the student: a 2-bit LSTM retrained on
cross-entropy alone overfits PTB within an epoch (train ppl 72 against valid 128, see
benchmarks/RESULTS.md "Longer retraining").

An LSTM teacher carries its own hidden state across BPTT chunks exactly as the student does;
that state is part of the training checkpoint so a resumed run continues identically.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    Both logits are ``[..., vocab]``; the result is a scalar, 0 when the two agree.
    """
    vocab = student_logits.size(-1)
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


class Distiller:
    """Runs the frozen FP teacher on each training batch and mixes its soft targets into the loss."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float = 1.0) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"distillation weight must be in (0, 1], got {weight}")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight = weight
        self.temperature = temperature
        self.recurrent = hasattr(teacher, "init_state")
        self.state: Any = None

    def reset(self) -> None:
        """Start the teacher's recurrent state from zero (a new epoch, like the student)."""
        self.state = None

    def mix(self, inputs: torch.Tensor, student_logits: torch.Tensor, ce_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - w) * ce_loss + w * distillation_loss``; advances the teacher's state."""
        with torch.no_grad():
            out = self.teacher(inputs, self.state)
            if self.recurrent:
                self.state = self.teacher.detach_state(out.state)
        kd = distillation_loss(student_logits, out.logits, self.temperature)
        if self.weight == 1.0:
            return kd
        return (1.0 - self.weight) * ce_loss + self.weight * kd

    def state_dict(self) -> dict[str, Any]:
        """The teacher's carried state (CPU tensors), for training checkpoints."""
        if self.state is None:
            return {"state": None}
        return {"state": [(h.cpu(), c.cpu()) for h, c in self.state]}

    def load_state_dict(self, saved: dict[str, Any], device: torch.device | str) -> None:
        """Restore :meth:`state_dict` onto ``device``."""
        state = saved.get("state")
        self.state = None if state is None else [(h.to(device), c.to(device)) for h, c in state]
