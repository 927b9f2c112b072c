"""Full-state checkpoints: a run killed at any point resumes where it stopped.

``FullStateCheckpointer`` (an ignite handler, usable in ``train_handlers``) writes ``<save_dir>/latest.pt`` atomically (``common.io.torch_save``):

* ``engine``: iteration, epoch_length (the epoch follows; mid-epoch positions are exact);
* ``objects``: ``state_dict()`` of the trainer's networks (DDP-unwrapped), EMA model, optimizers,
  GradScalers (``trainer.checkpoint_objects()``) plus any extra ``objects`` (lr schedulers...);
* ``rng``: python / numpy / torch / CUDA generator states of every process (tensors and lists only,
  so ``torch.load(weights_only=True)`` reads it).

It saves every ``save_interval_iterations`` iterations (never on the last iteration of an epoch) and at
every ``EPOCH_COMPLETED`` after all other epoch handlers (validation, lr schedulers) have run, so the
stored RNG/scheduler state is exactly what the next iteration would see. On ``STARTED`` it loads
``latest.pt`` (``resume=True``) or a given file (``resume=<path>``) if present.

Exact resume also needs a data order that depends only on ``(seed, epoch)``: use
``common.engines.make_dataloader`` (``ResumableSampler``); ``epoch_length`` must equal ``len(loader)``.
Only rank 0 writes; every rank takes part (RNG states are gathered).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

import ignite.distributed as idist

from common.engines.distributed import all_gather_object, unwrap
from common.io import text_bool, torch_load, torch_save

__all__ = [
    "FullStateCheckpointer",
    "WeightsExporter",
    "get_rng_state",
    "set_rng_state",
    "load_weights",
]

CHECKPOINT_FORMAT = 1
logger = logging.getLogger(__name__)


def get_rng_state() -> dict:
    """This process' generator states as tensors / primitive containers (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_key, np_state, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": [int(py_version), torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [str(np_key), torch.from_numpy(np.asarray(np_state, dtype=np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_cached)],
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(v) for v in py_state.tolist()), py_gauss))
    np_key, np_state, np_pos, np_has_gauss, np_cached = state["numpy"]
    np.random.set_state((np_key, np_state.numpy().astype(np.uint32), int(np_pos), int(np_has_gauss), float(np_cached)))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.nn.Module):
        obj = unwrap(obj)
    return obj.state_dict()


def _mismatch(network: torch.nn.Module, state: dict) -> str | None:
    """One sentence on how ``state`` differs from ``network``'s parameters (None when it fits exactly)."""
    own = unwrap(network).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors of another shape (first: {shapes[0]}, file vs network)")
    if missing:
        parts.append(f"{len(missing)} of the network's {len(own)} tensors missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors the network does not have (first: {unexpected[0]})")
    return "; ".join(parts)


def card_path(weights: str | Path) -> Path:
    """The weights card beside a weight file: ``models/model.pt`` -> ``models/model.json``."""
    return Path(weights).with_suffix(".json")


def write_card(weights: str | Path, card: dict) -> Path:
    """What a weight file was trained as (network sizes, contrasts, label scheme: the config values its
    ``load_weights(..., expect=...)`` compares), written atomically beside it."""
    from common.io import save_json

    return save_json({"weights": Path(weights).name, **_plain(card)}, card_path(weights))


def _plain(value):
    """JSON-plain ``value`` with an on/off flag given on the command line as text ("true", "False": fire passes
    ``--x true`` as a string) turned into the bool it spells, so a card says ``true`` whichever way it was set."""
    import json

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    value = json.loads(json.dumps(value, default=str))  # tuples vs lists, numpy scalars
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _flat(card: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in card.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _plain(v)
    return out


def _card_problem(path: Path, expect: dict) -> str | None:
    """How the card beside ``path`` differs from ``expect``, in a line (None: no card, or it agrees)."""
    import json

    card_file = card_path(path)
    if not card_file.is_file():
        return None
    try:
        card = _flat(json.loads(card_file.read_text()))
    except (OSError, ValueError, AttributeError):
        return None
    wanted = _flat(dict(expect))
    differ = [k for k in wanted if k in card and card[k] != wanted[k]]
    if not differ:
        return None
    shown = ", ".join(f"{k} {card[k]} (config: {wanted[k]})" for k in differ[:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    return f"{card_file.name} says they were trained with {shown}{more}"


def load_weights(network: torch.nn.Module, path: str | Path, key: str | None = None, strict: bool = True,
                 hint: str = "", expect: dict | None = None) -> torch.nn.Module:
    """Fill ``network`` from a weight file and return it: a plain state dict, MONAI ``CheckpointSaver``'s
    ``{"model": ...}`` or a full-state training checkpoint (``key`` picks its entry, e.g. ``"ema"``; default
    ``"network"``/``"generator"``/``"model"``). Loaded with ``weights_only=True``.

    Weights that do not fit stop with one short :class:`~common.io.DataError` naming the file, what differs
    and ``hint`` (how to get matching weights), never a page of ``state_dict`` keys and never a partial load.
    ``expect``: the config's values for what the weights card beside the file records (:func:`write_card`);
    a card that disagrees (other sizes, contrasts or label scheme) is refused by name before any tensor is read.
    """
    from common.io import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"weight file not found{'; ' + hint if hint else ''}")
    problem = _card_problem(path, dict(expect)) if expect else None
    if problem:
        raise DataError(path, f"weights do not fit the configured network: {problem}{'. ' + hint if hint else ''}")
    state = torch_load(path)
    if isinstance(state, dict) and "objects" in state:  # full-state training checkpoint
        state = state["objects"]
    if isinstance(state, dict) and not any(hasattr(v, "shape") for v in state.values()):
        names = [key] if key is not None else ["network", "generator", "model", "state_dict", "autoencoder"]
        found = next((n for n in names if n in state), None)
        if found is None:
            raise DataError(path, f"no {' / '.join(repr(n) for n in names)} entry in the weight file "
                                  f"(it has {sorted(state)[:8]})")
        state = state[found]
    if not isinstance(state, dict):
        raise DataError(path, f"not a state dict (found {type(state).__name__})")
    problem = _mismatch(network, state) if strict else None
    if problem:
        raise DataError(path, f"weights do not fit the configured network: {problem}{'. ' + hint if hint else ''}")
    unwrap(network).load_state_dict(state, strict=strict)
    return network


class FullStateCheckpointer:
    """Save/restore everything needed to continue a run bit-for-bit (see module docstring).

    Args:
        save_dir: folder of ``latest.pt`` (created on rank 0).
        save_interval_iterations: also save every N iterations (0 = only at epoch ends).
        resume: True -> load ``save_dir/latest.pt`` if it exists; a path -> load that file (must exist);
            False -> start fresh.
        objects: extra ``name -> object with state_dict/load_state_dict`` (lr schedulers, ...).
        filename: name of the checkpoint file.
        save_epoch_copies: also keep ``epoch_<n>.pt`` at every epoch end.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_interval_iterations: int = 0,
        resume: bool | str | Path = True,
        objects: dict[str, Any] | None = None,
        filename: str = "latest.pt",
        save_epoch_copies: bool = False,
    ):
        if save_interval_iterations < 0:
            raise ValueError(f"save_interval_iterations must be >= 0, got {save_interval_iterations}")
        self.save_dir = Path(save_dir)
        self.save_interval_iterations = int(save_interval_iterations)
        flag = text_bool(resume) if resume is not None else False  # --resume false arrives as text
        self.resume = flag if flag is not None else resume
        self.extra_objects = dict(objects or {})
        self.filename = filename
        self.save_epoch_copies = save_epoch_copies
        self._saves_registered = False
        self.loaded_from: Path | None = None

    @property
    def path(self) -> Path:
        return self.save_dir / self.filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._on_started)

    def objects(self, engine: Engine) -> dict[str, Any]:
        own = engine.checkpoint_objects() if hasattr(engine, "checkpoint_objects") else {}
        return {**own, **self.extra_objects}

    # -- saving -----------------------------------------------------------------------------------------
    def state(self, engine: Engine) -> dict:
        rng = all_gather_object(get_rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "engine": {"iteration": int(engine.state.iteration), "epoch_length": engine.state.epoch_length},
            "objects": {name: _state_of(obj) for name, obj in self.objects(engine).items()},
            "rng": rng,
        }

    def save(self, engine: Engine, path: str | Path | None = None) -> Path | None:
        state = self.state(engine)  # collective: all ranks call it
        if idist.get_rank() != 0:
            return None
        path = Path(path) if path is not None else self.path
        torch_save(state, path)
        return path

    def _on_iteration(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if length and engine.state.iteration % length == 0:
            return  # the epoch-end save (after validation / schedulers) covers it
        self.save(engine)

    def _on_epoch(self, engine: Engine) -> None:
        self.save(engine)
        if self.save_epoch_copies and idist.get_rank() == 0:
            torch_save(torch_load(self.path), self.save_dir / f"epoch_{engine.state.epoch}.pt")

    # -- loading ----------------------------------------------------------------------------------------
    def _on_started(self, engine: Engine) -> None:
        if not self._saves_registered:
            # registered now so they run after every handler attached before the run started
            if self.save_interval_iterations > 0:
                engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval_iterations), self._on_iteration)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch)
            self._saves_registered = True
        if self.resume is False or self.resume is None:
            return
        path = self.path if self.resume is True else Path(self.resume)
        if self.resume is True and not path.exists():
            return
        self.load(engine, path)

    def load(self, engine: Engine, path: str | Path) -> None:
        from common.io import DataError

        ckpt = torch_load(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise DataError(path, "not a full-state training checkpoint (missing 'format'); use load_weights for weights")
        objects = self.objects(engine)
        missing = sorted(set(objects) - set(ckpt["objects"]))
        if missing:
            raise DataError(path, f"checkpoint lacks {missing} (has {sorted(ckpt['objects'])})")
        for name, obj in objects.items():
            target = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
            try:
                target.load_state_dict(ckpt["objects"][name])
            except Exception as exc:
                raise DataError(path, f"cannot restore '{name}': {exc}") from exc
        saved = ckpt["engine"]
        if engine.state.epoch_length is not None and saved["epoch_length"] != engine.state.epoch_length:
            logger.warning(
                f"{path}: epoch length changed ({saved['epoch_length']} -> {engine.state.epoch_length}); "
                "the run continues from the same iteration but not at the same data position"
            )
        engine.load_state_dict(
            {"iteration": saved["iteration"], "epoch_length": engine.state.epoch_length or saved["epoch_length"],
             "max_epochs": engine.state.max_epochs}
        )
        rng_states = ckpt["rng"]
        set_rng_state(rng_states[idist.get_rank() % len(rng_states)])
        self.loaded_from = Path(path)
        logger.info(f"resumed from {path} at iteration {saved['iteration']}")


class WeightsCard:
    """Handler writing the weights card (:func:`write_card`) beside ``path`` when training completes (rank 0),
    next to whatever writes the weights (MONAI ``CheckpointSaver`` or :class:`WeightsExporter`)."""

    def __init__(self, path: str | Path, card: dict):
        self.path, self.card = Path(path), dict(card)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.write)

    def write(self, engine: Engine | None = None) -> Path | None:
        if idist.get_rank() != 0:
            return None
        return write_card(self.path, self.card)


class WeightsExporter:
    """Write one network's plain state dict (e.g. ``models/model.pt``) from the trainer's checkpoint objects.

    Avoids config cycles: a handler in ``train_handlers`` cannot reference ``@trainer.ema_model``, but this
    one looks the network up by ``key`` (``"network"``, ``"autoencoder"``, ``"discriminator"``, ``"ema"``)
    when it fires. ``event``: ``"COMPLETED"`` (end of training) or ``"EPOCH_COMPLETED"``. Rank 0 only, atomic.
    """

    def __init__(self, path: str | Path, key: str = "network", event: str = "COMPLETED"):
        if event not in ("COMPLETED", "EPOCH_COMPLETED"):
            raise ValueError(f"event must be 'COMPLETED' or 'EPOCH_COMPLETED', got {event!r}")
        self.path = Path(path)
        self.key = key
        self.event = getattr(Events, event)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self.export)

    def export(self, engine: Engine) -> Path | None:
        objects = engine.checkpoint_objects()
        if self.key not in objects:
            raise KeyError(f"WeightsExporter: trainer has no '{self.key}' (has {sorted(objects)})")
        if idist.get_rank() != 0:
            return None
        return torch_save(_state_of(objects[self.key]), self.path)
