"""The checkpoint layer: the only module that imports orbax.

A checkpoint directory holds one sub-folder per step, each with two items: ``state`` (the
train-state pytree: step, parameters, optimizer state) and ``metadata`` (a JSON dict, e.g. the
data position or the resolved config). The teacher is never part of it.

Guarantees:

* **Atomic steps.** orbax writes a step into ``<step>.orbax-checkpoint-tmp-<n>`` and renames it
  when complete, so a run killed during a save (even by SIGKILL) leaves the previous step
  readable and the half-written folder is never listed. :meth:`CheckpointManager.clean_stale_tmp`
  removes such leftovers (done on start-up).
* **Corruption fallback.** :meth:`CheckpointManager.restore_latest` tries steps newest first; an
  unreadable step (truncated or missing files) is skipped with a warning and moved aside to
  ``<step>.corrupt-<unix time>`` so the run can save that step again. If *every* step fails the
  error is raised instead: that is almost always a wrong target (shapes, tree), and silently
  restarting from scratch would be worse.
* **Resume order** (:func:`resolve_initial_state`): the workdir's latest checkpoint, then
  ``init_from`` (another run's checkpoint, parameters only), then scratch.
* **Preemption.** :func:`install_preemption_handler` turns SIGTERM into a flag the train loop
  polls; the loop then saves and exits cleanly.

Multi-host: every method that saves or restores is collective (all processes call it with the
same arguments); orbax writes the JSON item from process 0 only, and the folder renames done
here happen on process 0 followed by a barrier. Restore targets are abstract
(``jax.ShapeDtypeStruct`` with a sharding, see :func:`abstract_like`), so arrays are read
straight into their shards and no host holds a full copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from bort_jax.runtime import sharding

_STATE = "state"
_METADATA = "metadata"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_CORRUPT_MARKER = ".corrupt-"

log = logging.getLogger(__name__)


class Restored(NamedTuple):
  """A restored checkpoint."""

  step: int
  state: Any
  metadata: dict


class InitialState(NamedTuple):
  """What :func:`resolve_initial_state` chose.

  Attributes:
    state: the train state to start from.
    source: ``"workdir"``, ``"init_from"`` or ``"scratch"``.
    step: the restored step (0 unless resumed from the workdir).
    metadata: the checkpoint's JSON metadata (empty unless resumed from the workdir).
  """

  state: Any
  source: str
  step: int
  metadata: dict



def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return str(value)


def abstract_like(tree: Any) -> Any:
  """The restore target of a concrete pytree: same shapes, dtypes and shardings.

  Args:
    tree: a pytree of ``jax.Array`` (or ``jax.ShapeDtypeStruct`` with shardings, e.g. from
      ``jax.eval_shape`` of a jitted init with ``out_shardings``).

  Returns:
    A pytree of ``jax.ShapeDtypeStruct`` with the ``sharding`` of each leaf.
  """
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(leaf, tree)


def _with_default_sharding(abstract: Any) -> Any:
  """Leaves without a sharding go on the first local device (single-process only)."""
  def leaf(x):
    if not hasattr(x, "shape"):
      return x
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      if jax.process_count() > 1:
        raise ValueError("restore target leaves need a sharding in a multi-process run; build "
                         "the target with abstract_like() or jax.eval_shape of a jitted init.")
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, abstract)


def _restore_args(abstract: Any, partial: bool = False) -> Any:
  """orbax arguments that read each array straight into the target's dtype and sharding."""
  target = _with_default_sharding(abstract)

  def leaf_args(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs()  # a Python scalar or string leaf comes back as saved

  restore_args = jax.tree.map(leaf_args, target)
  return ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)


class CheckpointManager:
  """Saves and restores a train state plus JSON metadata in one directory.

  Args:
    directory: where the step folders go (created if missing, unless ``read_only``).
    save_interval_steps: ``save`` without ``force`` only writes when ``step`` is a multiple.
    max_to_keep: newest checkpoints kept (None keeps all).
    async_save: write in a background thread after the device-to-host copy (``save`` returns
      once the arrays are on the host, so the caller may donate them). ``async`` is a Python
      keyword, hence the name.
    read_only: open another run's checkpoints without ever writing or deleting.
  """

  def __init__(self, directory: str, save_interval_steps: int = 1,
               max_to_keep: int | None = 3, async_save: bool = True, read_only: bool = False):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_interval_steps = int(save_interval_steps)
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist.")
    if not read_only:
      if jax.process_index() == 0:
        os.makedirs(self.directory, exist_ok=True)
      sharding.barrier("bort_jax.runtime.checkpoint.mkdir")
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0, max_to_keep=None,
                                             enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=async_save)
    # Explicit handlers let a fresh manager read a step's array metadata before any restore
    # (init_from); the PyTree handler also allows partial restores.
    self._mgr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                       _METADATA: ocp.JsonCheckpointHandler()})
    if not read_only:
      self.clean_stale_tmp()

  # ----------------------------------------------------------------------------- saving
  def save(self, step: int, state: Any, metadata: dict | None = None,
           force: bool = False) -> bool:
    """Saves ``state`` at ``step`` (collective: every process calls it).

    Args:
      step: the train step the state is at.
      state: a pytree of arrays (e.g. ``train.TrainState``).
      metadata: a JSON-serialisable dict stored next to the state (numpy scalars are fine).
      force: save even when ``step`` is not a multiple of ``save_interval_steps``.

    Returns:
      Whether a save was started. False when the interval says no, or when this step is
      already on disk (a resumed run reaching a step it had saved is not an error).
    """
    if self.read_only:
      raise PermissionError(f"{self.directory} was opened read-only; it cannot be saved to.")
    step = int(step)
    # The interval is decided here (orbax's default policy would also save the first step it
    # sees whatever the interval), and orbax is always forced.
    if not force and step % self.save_interval_steps:
      return False
    if step in self._mgr.all_steps():
      log.info("checkpoint for step %d already exists in %s; not saving it again.", step,
               self.directory)
      return False
    meta = json.loads(json.dumps(dict(metadata or {}), default=_jsonable))
    items = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state),
                                  _METADATA: ocp.args.JsonSave(meta)})
    return bool(self._mgr.save(step, args=items, force=True))

  def wait(self) -> None:
    """Blocks until the in-flight asynchronous save (if any) is on disk."""
    self._mgr.wait_until_finished()

  def is_saving(self) -> bool:
    """Whether an asynchronous save is still being written."""
    return bool(self._mgr.is_saving_in_progress())

  # ----------------------------------------------------------------------------- reading
  def all_steps(self) -> list[int]:
    """Finalised steps on disk, oldest first (half-written folders are never listed)."""
    return sorted(int(s) for s in self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """The newest finalised step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores one step into the structure, dtypes and shardings of ``abstract_state``.

    Args:
      step: a step from :meth:`all_steps`.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings; see
        :func:`abstract_like`) or of concrete arrays, of the structure that was saved.

    Returns:
      ``(state, metadata)``.
    """
    if int(step) not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: "
                              f"{self.all_steps()}.")
    restored = self._mgr.restore(int(step), args=ocp.args.Composite(
        **{_STATE: _restore_args(abstract_state), _METADATA: ocp.args.JsonRestore()}))
    return restored[_STATE], dict(restored[_METADATA] or {})

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """Restores the newest readable step, skipping unreadable ones with a warning.

    Args:
      abstract_state: the restore target, as in :meth:`restore`.

    Returns:
      ``Restored(step, state, metadata)`` (a 3-tuple), or None when there is no checkpoint.

    Raises:
      RuntimeError: checkpoints exist but none can be restored into ``abstract_state`` (the
        last error is chained); usually a target that does not match what was saved.
    """
    self.wait()
    steps = self.all_steps()
    skipped, last_error = [], None
    for step in reversed(steps):
      try:
        state, metadata = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        # Anything tensorstore/orbax raise for a damaged folder (ValueError, OSError,
        # KeyError...) counts as unreadable; whether it was damage or a bad target is decided
        # below by whether an older step succeeds.
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one.",
                    step, self.directory, type(e).__name__, str(e)[:500])
        skipped.append(step)
        last_error = e
        continue
      if skipped:
        log.warning("restored step %d of %s after skipping unreadable step(s) %s.", step,
                    self.directory, skipped)
        self._quarantine(skipped)
      return Restored(step, state, metadata)
    if last_error is not None:
      raise RuntimeError(
          f"none of the checkpoints {steps} in {self.directory} could be restored into the "
          "given target; check that the model, optimizer and shapes match the run that saved "
          "them.") from last_error
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable steps aside (kept for inspection) so those steps can be saved again."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      stamp = int(time.time())
      for step in steps:
        src = self._step_dir(step)
        if src is not None:
          dst = f"{src}{_CORRUPT_MARKER}{stamp}"
          os.rename(src, dst)
          log.warning("moved unreadable checkpoint %s to %s.", src, dst)
    sharding.barrier("bort_jax.runtime.checkpoint.quarantine")
    self._mgr.reload()

  def _step_dir(self, step: int) -> str | None:
    for name in os.listdir(self.directory):
      if _TMP_MARKER in name or _CORRUPT_MARKER in name:
        continue
      digits = name.rsplit("_", 1)[-1]
      if digits.isdigit() and int(digits) == step:
        return os.path.join(self.directory, name)
    return None

  def stored_tree(self, step: int | None = None) -> Any:
    """Shapes and dtypes of what a step holds (orbax array metadata), without reading data.

    Args:
      step: a step; None means the latest.

    Returns:
      A nested dict mirroring the saved state with one metadata object (``.shape``,
      ``.dtype``) per array.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    meta = self._mgr.item_metadata(int(step))[_STATE]
    return getattr(meta, "tree", meta)

  def restore_subtree(self, step: int, abstract_subtree: Any) -> Any:
    """Restores only the leaves named by ``abstract_subtree`` (a nested dict of
    ``jax.ShapeDtypeStruct``, e.g. ``{"params": {...}}``), cast to its dtypes and shardings.

    Args:
      step: the step to read.
      abstract_subtree: nested dicts whose keys follow the saved state's field names.

    Returns:
      The restored nested dict.
    """
    restored = self._mgr.restore(int(step), args=ocp.args.Composite(**{
        _STATE: _restore_args(abstract_subtree, partial=True)}))
    return restored[_STATE]

  # ----------------------------------------------------------------------------- hygiene
  def clean_stale_tmp(self) -> list[str]:
    """Removes ``*.orbax-checkpoint-tmp*`` folders left by a killed save.

    Only runs when this manager has no save in flight (otherwise the folder being written
    would be deleted); process 0 deletes, then all processes meet at a barrier.

    Returns:
      The removed paths (empty on processes other than 0, or when a save is in flight).
    """
    if self.read_only or self.is_saving():
      return []
    removed = []
    if jax.process_index() == 0:
      for root, dirs, files in os.walk(self.directory, topdown=True):
        for name in list(dirs) + files:
          if _TMP_MARKER in name:
            path = os.path.join(root, name)
            if os.path.isdir(path):
              shutil.rmtree(path, ignore_errors=True)
              dirs.remove(name)
            else:
              os.remove(path)
            removed.append(path)
    for path in removed:
      log.warning("removed stale temporary checkpoint folder %s.", path)
    sharding.barrier("bort_jax.runtime.checkpoint.clean_tmp")
    return removed

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------ resume order
def _get_params(state: Any) -> Any:
  if isinstance(state, dict):
    return state["params"]
  return state.params


def _replace_params(state: Any, params: Any) -> Any:
  if isinstance(state, dict):
    return dict(state, params=params)
  return state.replace(params=params)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def load_params(init_from: str, abstract_params: Any, step: int | None = None
                ) -> tuple[dict[tuple[str, ...], Any], list[str]]:
  """Reads the parameters of another run's checkpoint that the target also has.

  Leaves of ``abstract_params`` found in the checkpoint's ``params`` (same path) are restored
  with the target's dtype and sharding; leaves it lacks (e.g. a fine-tuning head when starting
  from a pretraining checkpoint) are reported as missing. Optimizer state is never read.

  Args:
    init_from: a checkpoint directory written by :class:`CheckpointManager` (its latest step is
      used unless ``step`` is given), or one step folder inside it.
    abstract_params: nested dict of ``jax.ShapeDtypeStruct`` for the new run's parameters.
    step: an explicit step.

  Returns:
    ``(loaded, missing)``: a dict from key path to restored array, and the ``/``-joined paths
    of target leaves that the checkpoint does not hold.

  Raises:
    FileNotFoundError: no checkpoint there.
    ValueError: a parameter is present with a different shape (names the parameter).
  """
  directory = os.path.abspath(init_from)
  base = os.path.basename(directory.rstrip("/"))
  if step is None and base.isdigit() and os.path.isdir(os.path.join(directory, _STATE)):
    directory, step = os.path.dirname(directory), int(base)
  mgr = CheckpointManager(directory, read_only=True, async_save=False)
  try:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"init_from={init_from!r} holds no checkpoint.")
    stored = mgr.stored_tree(step)
    if not isinstance(stored, dict) or "params" not in stored:
      raise ValueError(f"checkpoint {directory} step {step} has no 'params' entry.")
    stored_flat = {_path_names(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(
        stored["params"], is_leaf=lambda x: hasattr(x, "shape"))}
    wanted, missing = {}, []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
      names = _path_names(path)
      if names not in stored_flat:
        missing.append("/".join(names))
        continue
      if tuple(stored_flat[names].shape) != tuple(leaf.shape):
        raise ValueError(
            f"parameter {'/'.join(names)} has shape {tuple(stored_flat[names].shape)} in "
            f"{init_from} but {tuple(leaf.shape)} in the new model.")
      wanted[names] = leaf
    nested: dict = {}
    for names, leaf in wanted.items():
      node = nested
      for n in names[:-1]:
        node = node.setdefault(n, {})
      node[names[-1]] = leaf
    restored = mgr.restore_subtree(step, {"params": nested})["params"] if wanted else {}
  finally:
    mgr.close()
  loaded = {}
  for names in wanted:
    node = restored
    for n in names:
      node = node[n]
    loaded[names] = node
  return loaded, missing


def resolve_initial_state(workdir_manager: CheckpointManager | None, init_from: str | None,
                          abstract_state: Any, init_fn: Callable[[], Any]) -> InitialState:
  """Chooses where training starts: the workdir, then ``init_from``, then scratch.

  Args:
    workdir_manager: the run's own manager (None: never resume).
    init_from: another run's checkpoint directory (or step folder) to take parameters from,
      or None / "".
    abstract_state: restore target of the full state (``.params`` or ``["params"]`` inside).
    init_fn: ``() -> state`` from scratch (already sharded). Also used under ``init_from``,
      whose parameters then replace the matching fresh ones; optimizer state stays fresh.

  Returns:
    An :class:`InitialState` naming the source that was used.
  """
  if workdir_manager is not None:
    found = workdir_manager.restore_latest(abstract_state)
    if found is not None:
      log.info("resuming from %s step %d.", workdir_manager.directory, found.step)
      return InitialState(found.state, "workdir", found.step, found.metadata)
  if init_from:
    loaded, missing = load_params(init_from, _get_params(abstract_state))
    if not loaded:
      raise ValueError(f"init_from={init_from!r} shares no parameter with the model.")
    if missing:
      log.warning("init_from %s lacks %d parameter(s), kept from scratch: %s", init_from,
                  len(missing), ", ".join(missing[:20]))
    state = init_fn()
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: loaded.get(_path_names(p), x), _get_params(state))
    return InitialState(_replace_params(state, params), "init_from", 0, {})
  return InitialState(init_fn(), "scratch", 0, {})


# ------------------------------------------------------------------------------- preemption
class PreemptionFlag:
  """Set by SIGTERM (or :meth:`set`); the train loop polls :meth:`should_stop`.

  In a multi-process run the processes must stop at the same step (saving is collective), so
  every ``sync_every``-th poll all-gathers the local flags and stops everywhere if any process
  was signalled. All processes must poll equally often (the loop polls once per step).
  """

  def __init__(self, sync_every: int = 1):
    self._event = threading.Event()
    self._stop = False
    self._polls = 0
    self._sync_every = max(1, int(sync_every))
    self._previous: dict[int, Any] = {}
    self.signal_number: int | None = None

  def set(self, signum: int | None = None, frame: Any = None) -> None:
    """Marks a stop request (also the signal handler)."""
    del frame
    self.signal_number = signum
    self._event.set()

  @property
  def signalled(self) -> bool:
    """Whether this process received a stop request (no cross-process agreement)."""
    return self._event.is_set()

  def should_stop(self) -> bool:
    """Whether the loop should save and exit now (agreed across processes)."""
    if self._stop:
      return True
    local = self._event.is_set()
    if jax.process_count() == 1:
      self._stop = local
      return local
    self._polls += 1
    if self._polls % self._sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(int(local), np.int32))
    self._stop = bool(np.asarray(flags).any())
    return self._stop

  __call__ = should_stop

  def uninstall(self) -> None:
    """Restores the signal handlers that were there before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,),
                               sync_every: int = 1) -> PreemptionFlag:
  """Makes SIGTERM (by default) request a save-and-exit instead of killing the process.

  Must be called from the main thread (Python delivers signals there).

  Args:
    signals: the signals to catch.
    sync_every: polls between cross-process agreements (multi-process runs).

  Returns:
    The :class:`PreemptionFlag`; pass ``flag.should_stop`` to the train loop.
  """
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("install_preemption_handler must be called from the main thread.")
  flag = PreemptionFlag(sync_every)
  for signum in signals:
    flag._previous[signum] = signal.signal(signum, flag.set)  # pylint: disable=protected-access
  return flag
