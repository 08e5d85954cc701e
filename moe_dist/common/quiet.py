"""Keep the libraries' start-up notices out of a tool's output: a tool's stdout is its result
(`--json` must parse), and notices that say nothing about the user's run bury the one line that
does.

- Megatron-Core's "Transformer Engine and Apex are not installed" warnings (one per module that
  looks for them): the data pipeline and the tools need neither.
- DeepSpeed's logger writes to stdout, and on a machine without CUDA it logs "Setting accelerator
  to CPU" at import. Its handler keeps the stream it sees when `deepspeed` is first imported, so
  that import runs here with stdout pointing at stderr: DeepSpeed's own lines (warnings, INFO)
  then go to stderr for the whole process, and the accelerator notice is dropped.

Call `quiet_library_notices()` at the top of a tool, before anything imports `deepspeed` or
`megatron`. The `deepspeed` launcher is another process: its own lines go to its stdout
(`deepspeed --quiet`, and `DS_ACCELERATOR=cpu` on CPU, silence it; docs/launch.md).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

_ACCELERATOR_NOTICE = "Setting accelerator to CPU"


class _DropAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _ACCELERATOR_NOTICE not in record.getMessage()


def quiet_library_notices(deepspeed: bool = True) -> None:
    """`deepspeed=False` for a tool that never imports DeepSpeed: its import (seconds) only to
    point its logger at stderr would be wasted."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    # The logger object exists before DeepSpeed adds its handler to it: the filter is in place for
    # the notice logged during the import itself.
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropAcceleratorNotice) for f in ds_logger.filters):
        ds_logger.addFilter(_DropAcceleratorNotice())
    if not deepspeed:
        return
    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed.utils.logging  # noqa: F401
    else:  # imported already (a test process): move its stdout handlers to stderr
        for handler in ds_logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
