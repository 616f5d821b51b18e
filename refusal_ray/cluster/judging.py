"""Judging stored completions: the named judges of a spec (or a judges file) over the `completions`
table, into the `judgements` table.

One judgement row per (completion, judge): its id hashes the completion's (cell_id, prompt_set,
prompt_id) and the judge's content hash (`refusal_ray.judges.config`), so judging is resumable and
idempotent: a completion already judged by the same judge without error is never sent again, and
a second call with nothing pending writes nothing. A row whose judging failed (`error` set) is
retried by the next call; its error stays in the store until then.

Where judges run:
  - local model judges (chat, classifier, guard) are Ray actors with the block's own resources
    (`resources.num_cpus`, `num_gpus`: 'auto' is a quarter GPU when the cluster has GPUs), each
    loading its checkpoint once and serving every model's completions, batch by batch (at most two
    chunks in flight per actor); without Ray (`use_ray=False`) they run in this process;
  - endpoint judges (openai) run here, from a bounded pool of concurrent requests;
  - substring judges run here.
Rows are written per chunk as chunks finish (atomic files), so a crash loses at most the chunks in
flight. A judge that cannot start stores its root cause as the error of every completion it was
given.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import pandas as pd

from refusal_ray.errors import SpecError, describe
from refusal_ray.judges.base import Item, Verdict, judgement_id
from refusal_ray.store import Store

KEY = ["model", "cell_id", "prompt_set", "prompt_id"]
CHUNK_BATCHES = 4          # a chunk (one Ray call, one file) is this many of the judge's batches
ENDPOINT_CHUNK = 64


@dataclass
class JudgeRun:
    """What a judging call did: rows written and completions that could not be judged, per judge."""

    written: dict = field(default_factory=dict)   # judge name -> rows written
    failed: dict = field(default_factory=dict)    # judge name -> completions with an error

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())


def completions_with_prompts(store: Store) -> pd.DataFrame:
    """The completions table with each row's instruction text in `prompt`. Stores written before the
    column existed get it from the spec's prompt files by id (the manifest's spec); a prompt that
    cannot be found is an error naming it."""
    comps = store.read("completions")
    if comps.empty or ("prompt" in comps.columns and comps["prompt"].notna().all()):
        return comps
    from refusal_ray.data import data_fingerprint, load_source, row_ids
    from refusal_ray.data.sources import pin_revisions
    from refusal_ray.spec import DataSpec

    manifest = store.read_json("manifest.json") or {}
    data = DataSpec.model_validate((manifest.get("spec") or {}).get("data"))
    data = pin_revisions(data, manifest.get("data_sources"))   # a hub dataset: the commit the run read
    where = f"{store}/manifest.json"
    loaded = {cls: load_source(getattr(data, cls), f"spec.data.{cls}", where) for cls in ("harmful", "harmless")}
    now = data_fingerprint(x.fingerprint for x in loaded.values())
    if manifest.get("data_fingerprint") not in (None, now):
        raise SpecError(f"{store}/manifest.json", "spec.data", "the prompt files changed since the completions were "
                        "generated (data fingerprint differs); the completions do not store their prompts, so "
                        "they cannot be judged against these files")
    texts = {}
    for cls in ("harmful", "harmless"):
        df, pf = loaded[cls].frame, loaded[cls].columns
        ids = row_ids(df, pf)
        texts[cls] = dict(zip(ids, df[pf.instruction_column].astype(str)))
    have = comps["prompt"] if "prompt" in comps.columns else pd.Series(None, index=comps.index, dtype=object)
    looked = [texts[s].get(str(i)) for s, i in zip(comps["prompt_set"], comps["prompt_id"])]
    comps["prompt"] = have.where(have.notna(), pd.Series(looked, index=comps.index))
    if comps["prompt"].isna().any():
        row = comps[comps["prompt"].isna()].iloc[0]
        raise SpecError(f"{store}/manifest.json", "spec.data", f"prompt {row['prompt_id']!r} of the stored "
                        f"completions is not in the prompt files any more")
    return comps


def pending(comps: pd.DataFrame, judgements: pd.DataFrame, name: str, judge_hash: str) -> pd.DataFrame:
    """Completions without an error-free judgement by this judge (name and content hash)."""
    if comps.empty or judgements.empty:
        return comps
    mine = judgements[(judgements["judge"] == name) & (judgements["judge_hash"] == judge_hash)
                      & judgements["error"].isna()]
    done = set(_keys(mine))
    keep = [k not in done for k in _keys(comps)]
    return comps[keep]


def judgement_rows(cfg, h: str, rows: pd.DataFrame, verdicts: list[Verdict], seconds: float) -> list[dict]:
    """Rows of the judgements table for one chunk of judge `cfg` (content hash `h`)."""
    each = seconds / max(1, len(rows))
    return [{"judgement_id": judgement_id(cell, pset, str(pid), cfg.name, h), "model": model, "cell_id": cell,
             "seed": int(seed), "prompt_set": pset, "prompt_id": str(pid), "judge": cfg.name,
             "judge_kind": cfg.kind, "judge_hash": h, **v.row(), "seconds": each}
            for model, cell, seed, pset, pid, v in zip(rows["model"], rows["cell_id"], rows["seed"],
                                                        rows["prompt_set"], rows["prompt_id"], verdicts)]


def record_judges(store: Store, judges: list, source: str, write: bool = True) -> None:
    """Add the judges to the manifest's `judges` ({name: kind, hash, config}); a name already used there
    for a judge of another hash is bad input (SpecError; `write=False` only checks, as `run` does before
    any cell). The config holds no secret (the key's variable name only)."""
    manifest = store.read_json("manifest.json") or {}
    known = dict(manifest.get("judges") or {})
    changed = False
    for j in judges:
        entry = {"kind": j.kind, "hash": j.judge_hash(), "config": j.model_dump(mode="json")}
        old = known.get(j.name)
        if old is not None and old["hash"] != entry["hash"]:
            raise SpecError(source, f"judges.{j.name}", f"this store already has a judge {j.name!r} with other "
                            f"settings (hash {old['hash']}, now {entry['hash']}); give the new judge another name")
        if old != entry:
            known[j.name], changed = entry, True
    if changed and write:
        manifest["judges"] = known
        store.write_json("manifest.json", manifest)


def _items(rows: pd.DataFrame) -> list[Item]:
    return [Item(str(p), str(c)) for p, c in zip(rows["prompt"], rows["completion"])]


def _abs(cfg):
    path = getattr(cfg, "path", None)
    if path is not None and os.path.isdir(path):
        return cfg.model_copy(update={"path": os.path.abspath(path)})
    return cfg



class _Writer:
    """Writes chunks' rows to the store (thread-safe counts) and advances a progress bar."""

    def __init__(self, store: Store, run: JudgeRun, bar, hashes: dict):
        self.store, self.run, self.bar, self.lock, self.hashes = store, run, bar, threading.Lock(), hashes
        self.done: dict[str, set] = {}

    def fail_rest(self, cfg, rows: pd.DataFrame, error: str) -> None:
        """Store `error` for every row of `rows` not written yet (a judging thread died)."""
        with self.lock:
            done = set(self.done.get(cfg.name, set()))
        rest = rows[[k not in done for k in _keys(rows)]]
        try:
            self(cfg, rest, [Verdict(error=error)] * len(rest), 0.0)
        except Exception:  # noqa: BLE001 - the store itself fails: count them, the run exits 1
            with self.lock:
                self.run.failed[cfg.name] = self.run.failed.get(cfg.name, 0) + len(rest)

    def __call__(self, cfg, rows: pd.DataFrame, verdicts: list[Verdict], seconds: float) -> None:
        if rows.empty:
            return
        out = judgement_rows(cfg, self.hashes[cfg.name], rows, verdicts, seconds)
        for model, grp in pd.DataFrame(out).groupby("model"):
            self.store.write("judgements", str(model), grp.drop(columns=["model"]).to_dict("records"))
        with self.lock:
            self.done.setdefault(cfg.name, set()).update(_keys(rows))
            self.run.written[cfg.name] = self.run.written.get(cfg.name, 0) + len(out)
            self.run.failed[cfg.name] = self.run.failed.get(cfg.name, 0) + sum(v.error is not None for v in verdicts)
            if self.bar is not None:
                self.bar.update(len(out))


def _keys(rows: pd.DataFrame) -> list[tuple]:
    return list(zip(*(rows[k].astype(str) for k in KEY)))


def _guarded(target, cfg, rows: pd.DataFrame, write: _Writer, *args) -> None:
    """Run a judging thread's target; whatever it raises is stored as the error of the rows it left."""
    try:
        target(cfg, rows, write, *args)
    except Exception as e:  # noqa: BLE001
        write.fail_rest(cfg, rows, f"judging failed: {describe(e)}")


def _chunks(rows: pd.DataFrame, size: int):
    for start in range(0, len(rows), size):
        yield rows.iloc[start: start + size]


def _judge_here(cfg, rows: pd.DataFrame, write: _Writer, chunk: int) -> None:
    """Build the judge in this process and judge `rows` chunk by chunk (substring, openai, or no Ray)."""
    from refusal_ray.judges import make_judge

    try:
        judge = make_judge(cfg)
    except Exception as e:  # noqa: BLE001 - stored as the root cause for every completion
        write(cfg, rows, [Verdict(error=f"judge cannot start: {describe(e)}")] * len(rows), 0.0)
        return
    for part in _chunks(rows, chunk):
        t0 = time.perf_counter()
        try:
            verdicts = judge.judge(_items(part))
        except Exception as e:  # noqa: BLE001
            verdicts = [Verdict(error=describe(e))] * len(part)
        write(cfg, part, verdicts, time.perf_counter() - t0)


def _judge_on_ray(cfg, rows: pd.DataFrame, write: _Writer, chunk: int, cluster: dict) -> None:
    """One actor for a local model judge; chunks streamed to it, two in flight at most."""
    import ray

    from refusal_ray.cluster.judge_worker import JudgeWorker

    r = cfg.resources
    gpus = (0.25 if cluster.get("GPU", 0) > 0 else 0) if r.num_gpus == "auto" else r.num_gpus
    if gpus > cluster.get("GPU", 0) or r.num_cpus > cluster.get("CPU", 0):   # it would wait forever
        write(cfg, rows, [Verdict(error=f"judge cannot start: it asks for {r.num_cpus} CPU(s) and {gpus} GPU(s), "
                                        f"the cluster has {cluster.get('CPU', 0):g} and {cluster.get('GPU', 0):g} "
                                        f"(judges.{cfg.name}.resources)")] * len(rows), 0.0)
        return
    actor = JudgeWorker.options(num_cpus=r.num_cpus, num_gpus=gpus, max_restarts=0).remote(   # calibration: driver's
        cfg.model_dump(mode="json", exclude={"calibration"}), int(max(1, r.num_cpus)))
    parts = list(_chunks(rows, chunk))
    in_flight: dict = {}
    try:
        while parts or in_flight:
            while parts and len(in_flight) < 2:
                part = parts.pop(0)
                in_flight[actor.judge.remote([(it.prompt, it.completion) for it in _items(part)])] = part
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            part = in_flight.pop(ready[0])
            try:
                verdicts, seconds = ray.get(ready[0])
                verdicts = [Verdict(**v) for v in verdicts]
            except Exception as e:  # noqa: BLE001 - the actor died (e.g. out of memory): store why
                verdicts, seconds = [Verdict(error=f"judge failed: {describe(e)}")] * len(part), 0.0
            write(cfg, part, verdicts, seconds)
    finally:
        ray.kill(actor)


def judge_store(store: Store, judges: list, *, source: str, use_ray: bool | None = None, address: str | None = None,
                progress: bool = True, log=print) -> JudgeRun:
    """Judge every stored completion that `judges` have not judged yet (`judge_completions`), then calibrate
    the judges that name a `calibration:` file (`calibrate`). Same arguments, return and errors as
    `judge_completions`."""
    run = judge_completions(store, judges, source=source, use_ray=use_ray, address=address, progress=progress,
                            log=log)
    calibrate(store, judges, log=log)
    return run


def calibrate(store: Store, judges: list, log=print) -> dict | None:
    """Each judge block with a `calibration:` file (and the inline substring judge) against that labelled file:
    the `refusal-ray judge --calibrate` figures, into the store's calibration.json (the report's "Judge
    calibration" section). Skipped when calibration.json already holds these files' bytes and judges'
    hashes. Runs in this process (a chat judge loads here; the labelled files are small). A judge whose
    calibration fails (its file gone, the judge cannot load, ...) is one warning line through `log` naming the
    judge and the error, and is left out of calibration.json; the judgements are already stored, so nothing
    is lost and nothing is raised. Returns the stored calibration (None: no judge names a file, or none could
    be calibrated)."""
    import hashlib
    from pathlib import Path

    from refusal_ray.judges.calibrate import CALIBRATION_FILE, calibrate_store

    blocks = [j for j in judges if getattr(j, "calibration", None)]
    if not blocks:
        return None
    stored = store.read_json(CALIBRATION_FILE) if store.exists(CALIBRATION_FILE) else None
    files = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() if Path(f).is_file() else None
             for f in dict.fromkeys(j.calibration for j in blocks)}
    want = {(j.name, j.calibration, j.judge_hash()) for j in blocks}
    have = {(r["judge"], r["file"], r.get("judge_hash")) for r in (stored or {}).get("results", [])}
    if stored is not None and stored.get("files") == files and want <= have:
        return stored
    log(f"judges: calibrating {', '.join(j.name for j in blocks)} against {', '.join(files)}")
    files_ok, inline, results = {}, {}, []
    for block in blocks:   # one judge at a time, so one that fails leaves the others' figures
        got = _Captured()
        try:
            calibrate_store(got, [block])
        except Exception as e:  # noqa: BLE001 - calibration is a report section; it must not fail the run
            log(f"judges: WARNING: calibration of judge {block.name} against {block.calibration} failed (its "
                f"judgements are stored): {type(e).__name__}: {e}".splitlines()[0])
            continue
        files_ok |= got.data["files"]
        *before, mine = got.data["results"]   # calibrate_store: the inline judge's rows, then this judge's
        inline |= {r["file"]: r for r in before}
        results.append(mine)
    if not results:
        return None
    out = {"files": files_ok, "results": [*inline.values(), *results]}   # as calibrate_store: the inline judge first
    store.write_json(CALIBRATION_FILE, out)
    return out


class _Captured:
    """A stand-in store for `calibrate_store`: keeps what it writes (one judge's calibration)."""

    data: dict

    def write_json(self, name: str, obj: dict) -> None:
        self.data = obj


def judge_completions(store: Store, judges: list, *, source: str, use_ray: bool | None = None,
                      address: str | None = None, progress: bool = True, log=print) -> JudgeRun:
    """Judge every stored completion that `judges` have not judged yet; write `judgements` rows.

    Args:
        judges: judge spec blocks (refusal_ray.judges.config).
        source: the file the judges came from (for error messages).
        use_ray: None: Ray when a local model judge is among `judges`; True / False force it.
    Returns:
        JudgeRun (rows written, completions that could not be judged, per judge).
    Raises:
        SpecError: a judge name that the store knows with other settings; prompts missing.
    """
    run = JudgeRun()
    if not judges:
        return run
    record_judges(store, judges, source)
    comps = completions_with_prompts(store)
    judgements = store.read("judgements")
    hashes = {j.name: j.judge_hash() for j in judges}
    todo = [(j, pending(comps, judgements, j.name, hashes[j.name])) for j in judges]
    todo = [(j, rows) for j, rows in todo if len(rows)]
    if not todo:
        log(f"judges: nothing to judge ({len(comps)} completions x {len(judges)} judge(s) already judged)")
        return run
    for j, rows in todo:
        log(f"  judge {j.name} ({j.kind}): {len(rows)} completion(s) to judge")
    from tqdm import tqdm

    bar = tqdm(total=sum(len(r) for _, r in todo), desc="judging", unit="completion", disable=not progress)
    write = _Writer(store, run, bar, hashes)
    local_models = [(j, r) for j, r in todo if j.uses_model()]
    here = [(j, r) for j, r in todo if not j.uses_model()]
    ray_used = bool(local_models) if use_ray is None else use_ray and bool(local_models)
    threads = [threading.Thread(target=_guarded, daemon=True,
                                args=(_judge_here, j, r, write, max(ENDPOINT_CHUNK, 8 * getattr(j, "max_concurrency", 1))))
               for j, r in here]
    started_here = False
    try:
        for t in threads:
            t.start()
        if ray_used:
            import ray

            from refusal_ray.cluster.driver import connect

            started_here = connect(address)
            cluster = ray.cluster_resources()
            workers = [threading.Thread(target=_guarded, daemon=True,
                                        args=(_judge_on_ray, _abs(j), r, write, CHUNK_BATCHES * j.batch_size, cluster))
                       for j, r in local_models]
            for t in workers:
                t.start()
            threads += workers
        else:
            for j, r in local_models:
                _guarded(_judge_here, j, r, write, CHUNK_BATCHES * j.batch_size)
        for t in threads:
            t.join()
    finally:
        bar.close()
        if started_here:
            import ray

            ray.shutdown()
    for name, n in run.failed.items():
        if n:
            log(f"judge {name}: {n} completion(s) could not be judged (error stored; rerun to retry)")
    return run


