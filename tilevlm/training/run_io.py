"""What a training run shows and hears besides its steps: the metrics log (JSON lines, and
TensorBoard scalars when tensorboard is installed), the progress bar, and Ctrl-C (the first one
asks the loop to save and stop at the next step boundary)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tilevlm.training import distributed
from tilevlm.training.train_config import TrainConfig
from tilevlm.weights.run_folder import METRICS_FILE

log = logging.getLogger(__name__)


class MetricsLog:
    """JSON lines in `out_dir/metrics.jsonl`, and TensorBoard scalars when tensorboard is
    installed."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / METRICS_FILE
        self._file = open(self.path, "a")
        self._tb = _tensorboard_writer(out_dir)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({**record, "time": time.time()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NoMetrics:
    """What ranks other than 0 write metrics to."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard_writer(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def progress_bar(cfg: TrainConfig, initial: int) -> Any:
    drawn = cfg.progress and distributed.is_main() and sys.stderr.isatty()  # no \r frames in files
    return tqdm(total=cfg.steps, initial=initial, desc="train", disable=not drawn,
                dynamic_ncols=True)


class SigintFlag:
    """Within the block, the first Ctrl-C only sets `requested` (the loop saves and stops at the
    next step boundary); a second one raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        log.warning("Ctrl-C: stopping after this step (press again to abort without saving)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
