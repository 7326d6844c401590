"""Submit a batch of long-context prompts to RetroInfer's /v1/jobs API and collect the results.

Each file under --prompts (sorted; *.txt is the prompt itself, *.json a request body with at least
"prompt") becomes one job: POST /v1/jobs, then GET /v1/jobs/{id} until its phase is done, failed or
cancelled. It first waits up to --wait seconds for GET /v1/models to answer (the model defaults to
the first one listed). At most --concurrency jobs are in flight; a 429 (the server already holds
`max_queued_jobs` jobs waiting for KV) is retried after its Retry-After. Results go to --results/<name>.json (the final job
object, "result" included) or <name>.error.json; a prompt whose <name>.json exists is skipped, so
a rerun resumes. With --api-key (default: the first of the comma-separated RETROINFER_API_KEY)
every call carries `Authorization: Bearer <key>`. SIGTERM/SIGINT cancel the jobs in flight (DELETE /v1/jobs/{id}). Exit status 0
when every job is done, 1 otherwise. Standard library only (it runs in any Python 3.8+).
"""

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TERMINAL = ("done", "failed", "cancelled")


class Busy(Exception):
    """The server answered 429; retry after `delay` seconds."""

    def __init__(self, delay):
        super().__init__(f"busy, retry after {delay}s")
        self.delay = delay


API_KEY = None     # set from --api-key in main()


def call(base, method, path, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if API_KEY:
        headers["Authorization"] = f"Bearer {API_KEY}"
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        if e.code == 429:
            raise Busy(float(e.headers.get("Retry-After") or 5)) from None
        raise RuntimeError(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from None
    return json.loads(raw) if raw else {}


def load_prompts(folder, skip_done_in):
    jobs = []
    for f in sorted(Path(folder).iterdir()):
        if f.suffix not in (".txt", ".json") or not f.is_file():
            continue
        if (Path(skip_done_in) / f"{f.stem}.json").exists():
            print(f"{f.stem}: result exists, skipped", flush=True)
            continue
        body = {"prompt": f.read_text()} if f.suffix == ".txt" else json.loads(f.read_text())
        if "prompt" not in body:
            raise SystemExit(f"{f}: a .json prompt file needs a 'prompt' field")
        jobs.append((f.stem, body))
    return jobs


def wait_for_models(base, wait, retry):
    """The served model names, once GET /v1/models answers (the service may still be loading)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return [m["id"] for m in call(base, "GET", "/v1/models").get("data") or []]
        except (OSError, RuntimeError) as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"{base} not ready after {wait:g}s: {e}") from None
            print(f"waiting for {base}: {e}", flush=True)
            time.sleep(retry)


def run(args):
    base = args.url
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if not Path(args.prompts).is_dir():
        raise SystemExit(f"no prompts folder {args.prompts}")
    pending = load_prompts(args.prompts, results)
    models = wait_for_models(base, args.wait, args.retry)
    model = args.model or (models or [None])[0]
    if model is None:
        raise SystemExit(f"{base}/v1/models lists no model")
    inflight = {}  # job id -> {"name", "started", "phase"}
    failures = 0
    not_before = 0.0  # no submission before this time (after a 429 or a connection error)

    def cancel_all(signum, _frame):
        for job_id, job in inflight.items():
            try:
                call(base, "DELETE", f"/v1/jobs/{job_id}", timeout=10)
                print(f"{job['name']}: cancelled {job_id}", flush=True)
            except Exception as e:  # best effort while shutting down
                print(f"{job['name']}: cancel {job_id} failed: {e}", flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, cancel_all)
    signal.signal(signal.SIGINT, cancel_all)

    def finish(name, job, ok):
        nonlocal failures
        failures += not ok
        (results / (f"{name}.json" if ok else f"{name}.error.json")).write_text(json.dumps(job, indent=1))
        print(f"{name}: {job.get('phase')} {job.get('error', '')}".rstrip(), flush=True)

    while pending or inflight:
        now = time.monotonic()
        while pending and len(inflight) < args.concurrency and now >= not_before:
            name, body = pending[0]
            try:
                job = call(base, "POST", "/v1/jobs", {"model": model, "max_tokens": args.max_tokens, **body})
            except Busy as busy:
                not_before = now + busy.delay
                print(f"{name}: server busy, retrying in {busy.delay:g}s", flush=True)
                break
            except OSError as e:  # connection refused/reset, timeout: retry this prompt later
                not_before = now + args.retry
                print(f"{name}: submit failed ({e}), retrying in {args.retry:g}s", flush=True)
                break
            except RuntimeError as e:  # the server rejected the request (4xx/5xx): give up on it
                pending.pop(0)
                finish(name, {"phase": "failed", "error": str(e)}, False)
                continue
            pending.pop(0)
            inflight[job["id"]] = {"name": name, "started": now, "phase": job.get("phase")}
            print(f"{name}: submitted {job['id']} ({len(body['prompt'])} chars)", flush=True)
        time.sleep(args.poll)
        for job_id, seen in list(inflight.items()):
            name = seen["name"]
            try:
                job = call(base, "GET", f"/v1/jobs/{job_id}")
            except (OSError, RuntimeError) as e:  # transient: ask again at the next poll
                print(f"{name}: status of {job_id} unavailable ({e})", flush=True)
                continue
            phase = job.get("phase")
            if phase in TERMINAL:
                del inflight[job_id]
                finish(name, job, phase == "done")
            elif args.timeout and time.monotonic() - seen["started"] > args.timeout:
                try:
                    call(base, "DELETE", f"/v1/jobs/{job_id}")
                except (OSError, RuntimeError) as e:
                    print(f"{name}: cancel {job_id} failed: {e}", flush=True)
                del inflight[job_id]
                finish(name, {**job, "phase": "failed", "error": f"timed out after {args.timeout:g}s"}, False)
            elif args.verbose or phase != seen["phase"]:
                seen["phase"] = phase
                progress = 100 * float(job.get("prefill_progress") or 0)
                print(f"{name}: {phase}, prefill {progress:.1f}%", flush=True)
    print(f"finished: {failures} failed", flush=True)
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="Serve endpoint, e.g. http://retroinfer-serve-svc:8000")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--prompts", default="/data/prompts")
    p.add_argument("--results", default="/data/results")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=2, help="jobs in flight at once")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between status polls")
    p.add_argument("--timeout", type=float, default=0, help="seconds per job, 0 = none")
    p.add_argument("--retry", type=float, default=10.0, help="seconds between retries after a connection error")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the service to come up")
    p.add_argument("--verbose", action="store_true", help="print every poll's phase and progress")
    p.add_argument("--api-key", default=(os.environ.get("RETROINFER_API_KEY") or "").split(",")[0].strip() or None,
                   help="bearer key for the service (default: the first of RETROINFER_API_KEY)")
    args = p.parse_args(argv)
    global API_KEY
    API_KEY = args.api_key
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
