"""The checkpoint layer: the only module that imports orbax.

A checkpoint directory holds one sub-folder per step, each with three items: ``state`` (the
train-state pytree: step, parameters, optimizer state), ``metadata`` (a JSON dict, e.g. the
data position or the resolved config) and ``integrity`` (one checksum per array shard, written
by the process that owns the shard; see ``runtime/integrity.py``). The teacher is never part
of it.

Guarantees:

* **Atomic steps.** orbax writes a step into ``<step>.orbax-checkpoint-tmp-<n>`` and renames it
  when complete, so a run killed during a save (even by SIGKILL) leaves the previous step
  readable and the half-written folder is never listed. :meth:`CheckpointManager.clean_stale_tmp`
  removes such leftovers (done on start-up).
* **No silent corruption.** Every restore compares the restored shards with the checksums
  written at save time; a mismatch (e.g. bytes overwritten in place) makes the step unreadable.
  A step saved before checksums existed restores with a one-line notice.
* **Corruption fallback.** :meth:`CheckpointManager.restore_latest` tries steps newest first; an
  unreadable step (truncated, missing or overwritten files) is skipped with one warning line and
  moved aside to ``<step>.corrupt-<unix time>`` so the run can save that step again. If *every*
  step fails, :class:`CheckpointRestoreError` says so in one paragraph: that is almost always a
  wrong target (shapes, tree), and silently restarting from scratch would be worse.
* **Resume order** (:func:`resolve_initial_state`): the workdir's latest checkpoint, then
  ``init_from`` (another run's checkpoint, parameters only), then scratch.
* **Preemption.** ``runtime/preemption.py`` (re-exported here).

Multi-host: every method that saves or restores is collective (all processes call it with the
same arguments); orbax writes the metadata from process 0 only, each process writes its own
checksums, and folder renames happen on process 0 followed by a barrier. Restore targets are abstract
(``jax.ShapeDtypeStruct`` with a sharding, see :func:`abstract_like`), so arrays are read
straight into their shards and no host holds a full copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from bort_jax.runtime import integrity, restore_noise, sharding
from bort_jax.runtime.fileio import to_jsonable

_STATE = "state"
_METADATA = "metadata"
_INTEGRITY = "integrity"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_CORRUPT_MARKER = ".corrupt-"

log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist but none can be restored; the message is one paragraph for the user."""


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
      once the arrays are on the host, so the caller may donate them).
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
    # Every process writes its own integrity file (primary_host=None), inside the step's
    # temporary folder, so the checksums are committed with the step they describe.
    integrity_handler = ocp.JsonCheckpointHandler(
        filename=f"process_{jax.process_index()}.json",
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))
    self._mgr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                       _METADATA: ocp.JsonCheckpointHandler(),
                       _INTEGRITY: integrity_handler})
    self._quiet = restore_noise.RestoreNoiseFilter(self.directory)
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
      Whether a save was started: not when the interval says no, or when this step is
      already on disk (not an error).
    """
    if self.read_only:
      raise PermissionError(f"{self.directory} was opened read-only; it cannot be saved to.")
    step = int(step)
    # The interval is decided here (orbax's policy would also save the first step it sees).
    if not force and step % self.save_interval_steps:
      return False
    if step in self._mgr.all_steps():
      log.info("checkpoint for step %d already exists in %s; not saving it again.", step,
               self.directory)
      return False
    meta = to_jsonable(dict(metadata or {}))
    # The checksums are computed on the shards' devices before orbax copies them to the host.
    items = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state),
                                  _METADATA: ocp.args.JsonSave(meta),
                                  _INTEGRITY: ocp.args.JsonSave(integrity.shard_records(state))})
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

    Collective: the restored shards are checked against the step's checksums and every
    process reaches the same verdict.

    Args:
      step: a step from :meth:`all_steps`.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings; see
        :func:`abstract_like`) or of concrete arrays, of the structure that was saved.

    Returns:
      ``(state, metadata)``.

    Raises:
      integrity.IntegrityError: the data differs from what was saved (or its checksums are
        missing); any error of orbax/tensorstore for a damaged folder.
    """
    if int(step) not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: "
                              f"{self.all_steps()}.")
    restored = self._restore_checked(int(step), abstract_state, ocp.args.Composite(
        **{_STATE: _restore_args(abstract_state), _METADATA: ocp.args.JsonRestore()}))
    return restored[_STATE], dict(restored[_METADATA] or {})

  def metadata(self, step: int) -> dict:
    """The JSON metadata saved with ``step`` (empty when there is no such step)."""
    if int(step) not in self.all_steps():
      return {}
    restored = self._mgr.restore(int(step), args=ocp.args.Composite(
        **{_METADATA: ocp.args.JsonRestore()}))
    return dict(restored[_METADATA] or {})

  def _restore_checked(self, step: int, abstract: Any, args: Any) -> Any:
    """orbax restore of ``args`` plus the collective checksum comparison of its state item."""
    records, restored, error = None, None, None
    self._quiet.install()  # before: the noise can start as soon as orbax's loop closes
    try:
      records = self._integrity_records(step)
      restored = self._mgr.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      error = e  # raised below, after the other processes have heard of it
      self._quiet.attempt_failed()  # its late callbacks may come after it returns
    if error is None and not self._quiet.keep:
      self._quiet.uninstall()
    any_failed, bad, unchecked = integrity.agreed_check(
        abstract, None if restored is None else restored[_STATE], records, error is not None)
    if error is not None:
      raise error
    if any_failed:
      raise integrity.IntegrityError("another process could not read its part of this step")
    if bad:
      raise integrity.IntegrityError(
          f"checksum mismatch in {len(bad)} array(s), e.g. {', '.join(bad[:3])}: the data "
          "on disk differs from what was saved")
    if records is None:
      log.warning("checkpoint step %d in %s predates integrity checksums; restored without "
                  "verifying it.", step, self.directory)
    elif unchecked:  # a restore sharding that cuts saved shards across processes
      log.warning("checkpoint step %d in %s: %d saved shard(s) span processes in this sharding "
                  "and were not verified.", step, self.directory, unchecked)
    return restored

  def _integrity_records(self, step: int) -> list[dict] | None:
    """The step's checksums; None for a step saved before they existed."""
    step_dir = self._step_dir(step)
    if step_dir is None:
      raise FileNotFoundError(f"step folder of step {step} not found in {self.directory}")
    item = os.path.join(step_dir, _INTEGRITY)
    if os.path.isdir(item):
      return integrity.read_records(item)
    try:  # orbax's record of the items the step was saved with
      with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
        saved_items = json.load(f).get("item_handlers") or {}
    except (OSError, ValueError):
      saved_items = {}
    if _INTEGRITY in saved_items:
      raise integrity.IntegrityError(f"its integrity folder {item} is missing")
    return None

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """Restores the newest readable step, skipping unreadable ones with one warning each.

    Args:
      abstract_state: the restore target, as in :meth:`restore`.

    Returns:
      ``Restored(step, state, metadata)`` (a 3-tuple), or None when there is no checkpoint.

    Raises:
      CheckpointRestoreError: checkpoints exist but none can be restored into
        ``abstract_state`` (the last error is chained); usually a target that does not match
        what was saved.
    """
    self.wait()
    steps = self.all_steps()
    skipped: list[tuple[int, str]] = []
    last_error = None
    for step in reversed(steps):
      try:
        state, metadata = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        # Any error counts as unreadable; damage or a bad target is decided by whether an older
        # step succeeds.
        skipped.append((step, restore_noise.one_line(e)))
        last_error = e
        continue
      self._quarantine(skipped, step)
      return Restored(step, state, metadata)
    if last_error is not None:
      reasons = "; ".join(f"step {s}: {r}" for s, r in skipped)
      raise CheckpointRestoreError(
          f"none of the checkpoints {steps} in {self.directory} could be restored ({reasons}). "
          "If the config changed since they were saved (model, optimizer, shapes), restore "
          "it, or start afresh in a new workdir (or move this checkpoint folder aside).") \
          from last_error
    return None

  def _quarantine(self, skipped: list[tuple[int, str]], restored_step: int) -> None:
    """Moves unreadable steps aside (kept for inspection) so those steps can be saved again."""
    moved = {}
    if jax.process_index() == 0 and not self.read_only:
      stamp = int(time.time())
      for step, _ in skipped:
        src = self._step_dir(step)
        if src is not None:
          moved[step] = f"{src}{_CORRUPT_MARKER}{stamp}"
          os.rename(src, moved[step])
    for step, reason in skipped:
      where = (f"moved to {moved[step]}" if step in moved else "left in place (read-only)"
               if self.read_only else "moved aside by process 0")
      log.warning("skipped checkpoint step %d in %s, unreadable (%s); %s; using step %d.",
                  step, self.directory, reason, where, restored_step)
    if skipped and not self.read_only:
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
    Those leaves are checked against the step's checksums, as in :meth:`restore`.

    Args:
      step: the step to read.
      abstract_subtree: nested dicts whose keys follow the saved state's field names.

    Returns:
      The restored nested dict.
    """
    restored = self._restore_checked(int(step), abstract_subtree, ocp.args.Composite(**{
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
    self._quiet.uninstall()

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


def load_params_from_checkpoint(init_from: str, abstract_params: Any, step: int | None = None
                                ) -> tuple[dict[tuple[str, ...], Any], list[str]]:
  """Reads the parameters of another run's checkpoint that the target also has.

  Leaves of ``abstract_params`` found in the checkpoint's ``params`` (same path) are restored
  with the target's dtype and sharding (and checked against the step's checksums); leaves it
  lacks (e.g. a fine-tuning head when starting from a pretraining checkpoint) are reported as
  missing. Optimizer state is never read. (``interop.export.load`` reads the other format,
  an exported model folder.)

  Args:
    init_from: a checkpoint directory written by :class:`CheckpointManager` (its latest step is
      used unless ``step`` is given), or one step folder inside it.
    abstract_params: nested dict of ``jax.ShapeDtypeStruct`` for the new run's parameters.
    step: an explicit step.

  Returns:
    ``(loaded, missing)``: a dict from key path (tuple of names) to restored array, and the
    ``/``-joined paths of target leaves that the checkpoint does not hold.

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
    stored_flat = traverse_util.flatten_dict(stored["params"])
    wanted, missing = {}, []
    for names, leaf in traverse_util.flatten_dict(abstract_params).items():
      if names not in stored_flat:
        missing.append("/".join(names))
        continue
      if tuple(stored_flat[names].shape) != tuple(leaf.shape):
        raise ValueError(
            f"parameter {'/'.join(names)} has shape {tuple(stored_flat[names].shape)} in "
            f"{init_from} but {tuple(leaf.shape)} in the new model.")
      wanted[names] = leaf
    restored = {}
    if wanted:
      restored = mgr.restore_subtree(step, {"params": traverse_util.unflatten_dict(wanted)})
      restored = traverse_util.flatten_dict(restored["params"])
  finally:
    mgr.close()
  return {names: restored[names] for names in wanted}, missing


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
    loaded, missing = load_params_from_checkpoint(init_from, _get_params(abstract_state))
    if not loaded:
      raise ValueError(f"init_from={init_from!r} shares no parameter with the model.")
    if missing:
      log.warning("init_from %s lacks %d parameter(s), kept from scratch: %s", init_from,
                  len(missing), ", ".join(missing[:20]))
    state = init_fn()
    params = traverse_util.unflatten_dict(
        {**traverse_util.flatten_dict(_get_params(state)), **loaded})
    return InitialState(_replace_params(state, params), "init_from", 0, {})
  return InitialState(init_fn(), "scratch", 0, {})
