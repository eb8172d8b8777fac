"""Local path or Hugging Face Hub id; a quick look at whether the Hub answers; one clear line when the Hub
cannot give what was asked for."""

import os
import threading

from vitfood.common import UserError, first_line

PROBE_SECONDS = 3.0  # a Hub that has not answered by then is treated as unreachable (a HEAD takes ~0.3 s)
_unreachable = []  # why the Hub was found unreachable in this process (then the Hub libraries run offline)


def is_path(name):
    """A local path (as opposed to a Hub id): it exists, or it is spelled like a path."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def hub_error(kind, name, e):
    """The UserError for a `kind` ('dataset' or 'model') that could not be had from the Hub."""
    if _unreachable:
        why = f"the Hugging Face Hub is unreachable ({_unreachable[0]}) and it is not in the local cache"
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        why = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
    else:
        why = "it is not a local path and the Hugging Face Hub has no such repository, or refused access"
    hint = "a local imagefolder or save_to_disk folder" if kind == "dataset" else "a local model folder"
    return UserError(f"cannot load {kind} {name!r}: {why} ({first_line(e)}); pass {hint}, or try --preset demo")


def probe_seconds():
    """PROBE_SECONDS, or VITFOOD_HUB_PROBE_SECONDS: another limit, or 0 to skip the probe (behind a slow proxy;
    the Hub libraries then retry as they do)."""
    text = os.environ.get("VITFOOD_HUB_PROBE_SECONDS", "").strip()
    try:
        seconds = float(text) if text else PROBE_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UserError(f"VITFOOD_HUB_PROBE_SECONDS={text!r}: expected seconds, a number >= 0 (0 skips the Hub check)")
    return seconds


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
    seconds = probe_seconds()
    if not constants.HF_HUB_OFFLINE and not _unreachable and seconds > 0:
        reason = _probe(constants.ENDPOINT, seconds)
        if reason:
            go_offline(reason)
    if model and not is_path(model):
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise hub_error("model", model, e)
