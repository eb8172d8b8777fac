"""Local path or Hugging Face Hub id; a quick look at whether the Hub answers; one clear line when the Hub
cannot give what was asked for."""

import logging
import math
import os
import sys
import threading

from vitfood.common import UserError, first_line

PROBE_SECONDS = 3.0  # a Hub that has not answered by then is treated as unreachable (a HEAD takes ~0.3 s)
REQUEST_SECONDS = 30.0  # the longest wait for one Hub request of vitfood's own (a model's config, a data set's listing)
_unreachable = []  # why the Hub was found unreachable in this process (then the Hub libraries run offline)


def is_path(name):
    """A local path (as opposed to a Hub id): it exists, or it is spelled like a path (a Hub id is a name or
    namespace/name)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def run_model(name):
    """`name`, or its model/ folder when `name` is a vitfood run folder (what `done:` prints) rather than a model."""
    if not name:
        return name
    inner = os.path.join(os.path.expanduser(name), "model")
    if is_path(name) and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")) and \
            os.path.isfile(os.path.join(inner, "config.json")):
        return inner
    return name


def check_local(**paths):
    """One line for the first of `paths` ({what: name}) that is spelled as a local path and does not exist:
    before any Hub probe or heavy work, so a typo is not reported as a Hub failure."""
    for what, name in paths.items():
        if name and is_path(name) and not os.path.exists(os.path.expanduser(name)):
            raise UserError(f"--{what} {name}: no such folder")


# what the Hub libraries' errors say when the network, not the repository, failed
NO_CONNECTION = ("couldn't connect", "name or service not known", "temporary failure in name resolution",
                 "failed to resolve", "connection refused", "network is unreachable", "connecterror", "connecttimeout")


def _no_connection(e):
    seen = 0
    while e is not None and seen < 10:
        if any(m in f"{type(e).__name__} {e}".lower() for m in NO_CONNECTION):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def hub_error(kind, name, e):
    """The UserError for a `kind` ('dataset' or 'model') that could not be had from the Hub."""
    if _unreachable:
        why = f"the Hugging Face Hub is unreachable ({_unreachable[0]}) and it is not in the local cache"
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        why = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
    elif _no_connection(e):
        why = "the Hugging Face Hub could not be reached (no connection) and it is not in the local cache"
    else:
        why = "it is not a local path and the Hugging Face Hub has no such repository, or refused access"
    hint = "a local imagefolder or save_to_disk folder (or --dataset synthetic)" if kind == "dataset" else \
        "a local model folder (a vitfood run's model/ or checkpoint-<step>/)"
    return UserError(f"cannot load {kind} {name!r}: {why} ({first_line(e)}); pass {hint}")


def _seconds(name, default, zero):
    text = os.environ.get(name, "").strip()
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and (seconds > 0 or (zero and seconds == 0))):
        raise UserError(f"{name}={text!r}: expected seconds, a finite number > 0{zero}")
    return seconds


def probe_seconds():
    """PROBE_SECONDS, or VITFOOD_HUB_PROBE_SECONDS: another limit, or 0 to skip the probe (behind a slow proxy;
    the Hub libraries then retry as they do)."""
    return _seconds("VITFOOD_HUB_PROBE_SECONDS", PROBE_SECONDS, " (or 0 to skip the Hub check)")


def request_seconds():
    """REQUEST_SECONDS, or VITFOOD_HUB_TIMEOUT_SECONDS."""
    return _seconds("VITFOOD_HUB_TIMEOUT_SECONDS", REQUEST_SECONDS, "")


def _bounded(what, ask, seconds):
    """ask(), or one line saying that the Hub did not answer within `seconds` (a request can hang on a
    connection that never answers, whatever the libraries' own timeouts)."""
    outcome = []

    def run():
        try:
            outcome.append((ask(), None))
        except Exception as e:
            outcome.append((None, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise UserError(f"cannot load {what}: the Hugging Face Hub did not answer within {seconds:g} s (timed out); "
                        "check the network, or raise VITFOOD_HUB_TIMEOUT_SECONDS")
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def _probe(endpoint, seconds):
    """None when `endpoint` answers an HTTP request within `seconds`, else why not. The request runs in
    a thread, because a name lookup on a dead network ignores socket timeouts."""
    from huggingface_hub.utils import get_session
    outcome = []

    def ask():
        try:
            get_session().head(endpoint, timeout=seconds)  # any HTTP answer will do
            outcome.append(None)
        except Exception as e:  # connection refused, name not resolved, proxy error, timeout
            outcome.append(first_line(e, 120))

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(seconds + 1)
    return outcome[0] if outcome else f"{endpoint} did not answer within {seconds:g} s"


class _OneRetryLine(logging.Filter):
    """huggingface_hub logs two lines per retry of a request (ten before it gives up): the first is said once,
    as a note; the rest are dropped."""
    said = False

    def filter(self, record):
        text = record.getMessage()
        if "Retry" not in text and "thrown while requesting" not in text:
            return True
        if not _OneRetryLine.said:
            _OneRetryLine.said = True
            print("note: the Hugging Face Hub did not answer; its library retries for up to about 25 s "
                  "(VITFOOD_HUB_PROBE_SECONDS=0 skips vitfood's own 3 s check)", file=sys.stderr, flush=True)
        return False


def quiet_retries():
    logging.getLogger("huggingface_hub.utils._http").addFilter(_OneRetryLine())


def go_offline(reason):
    """Switch huggingface_hub, transformers and datasets to offline mode in this process: cached repositories
    load, anything else fails at once instead of after their retries."""
    from huggingface_hub import constants
    import datasets.config
    _unreachable[:] = [reason]
    os.environ["HF_HUB_OFFLINE"] = "1"  # for anything imported later, and for child processes
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def prepare(dataset=None, model=None, trust_remote_code=False):
    """Before any heavy work: find out whether the Hub ids among `dataset` and `model` can be had (pass None
    for local paths, named configs and the synthetic set). When the Hub does not answer, the Hub libraries
    go offline, so cached copies still load and the rest fails at once. The model is checked (its
    config.json, a few KB) before any data set is prepared, so a missing model is not found only after."""
    names = [n for n in (dataset, model) if n and not is_path(n)]
    if not names:
        return
    from huggingface_hub import constants
    quiet_retries()
    seconds = probe_seconds()
    if not constants.HF_HUB_OFFLINE and not _unreachable and seconds > 0:
        reason = _probe(constants.ENDPOINT, seconds)
        if reason:
            go_offline(reason)
    limit = request_seconds()
    if model and not is_path(model):
        from transformers import AutoConfig
        try:
            _bounded(f"model {model!r}", lambda: AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code),
                     limit)
        except UserError:
            raise
        except Exception as e:
            raise hub_error("model", model, e)
    if dataset and not is_path(dataset) and not constants.HF_HUB_OFFLINE:  # bounded: the data set loader is not
        from huggingface_hub import HfApi
        try:
            _bounded(f"dataset {dataset!r}", lambda: HfApi().dataset_info(dataset, timeout=limit), limit)
        except UserError:
            raise
        except Exception:
            pass  # an answer, if not a listing: the data set loader says what is wrong
