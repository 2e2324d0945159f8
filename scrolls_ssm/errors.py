"""Which failures are the user's to fix, and how to tell that the Hugging Face Hub could not be reached.

The command line prints user errors as one line (exit status 2) and lets everything else, which is a bug, keep its
traceback. User errors are the toolkit's own `ValueError` subclasses (`RunConfigError`, `ScrollsDataError`,
`ModelDirError`) and the plain `ValueError`s it raises for bad input, and `OSError`: files that are missing or
unreadable, and huggingface_hub's offline / not-in-cache errors (`OfflineModeIsEnabled`, `LocalEntryNotFoundError`,
transformers' "couldn't connect" `OSError`). Errors that arrive as some other type are converted where they arise, by
the code that knows which key or id they are about (`build.py` for the model config and Hub checkpoints, `data.py`
for the dataset), so that the message can name the key and the fix.
"""

from __future__ import annotations

import importlib
import os
import socket

_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # how huggingface_hub reads its boolean variables
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP clients the Hub libraries use (huggingface_hub 1.x: httpx; 2.x: httpx2)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    types: list[type[BaseException]] = [
        OfflineModeIsEnabled,
        LocalEntryNotFoundError,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
    ]
    for module_name in ("httpx", "httpx2", "requests"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            error_type = getattr(module, name, None)
            if isinstance(error_type, type) and issubclass(error_type, BaseException):
                types.append(error_type)
    return tuple(types)


def hub_unreachable(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, says the Hub could not be reached (or offline mode is on
    and the files are not in the local cache)."""
    types = _network_error_types()
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def offline_note() -> str:
    """Which offline switch is set, for messages about an unreachable Hub ('' when none is)."""
    on = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(name, "").upper() in _TRUE]
    return f" ({' and '.join(f'{name}={os.environ[name]}' for name in on)} set)" if on else ""


def reach_hub_hint() -> str:
    """The last part of the fix in a 'Hub could not be reached' message: how to let the Hub be reached."""
    if offline_note():
        return "or unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on a machine that can reach the Hub"
    return "or check that this machine can reach https://huggingface.co (network, proxy, HF_ENDPOINT)"


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (some library messages span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
