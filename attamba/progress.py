"""What a training run prints: one line per logging interval, or one live line on a terminal."""

from __future__ import annotations

import sys


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Step, loss, tokens/s and ETA per logging interval; messages (evaluations, the end) between them."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.live = enabled and sys.stdout.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        eta = format_eta((self.total - step) * seconds_per_step)
        line = f"step {step:>6}/{self.total} | loss {loss:7.4f} | {tokens_per_s:,.0f} tok/s | ETA {eta}"
        print(("\r" + line) if self.live else line, end="" if self.live else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.live else "") + text, flush=True)
