import os
import tempfile

import pytest
import torch

# Serve apps that the tests start (in process, or through `serve run`) keep their jobs in a store
# of this session's own, never in the user's (~/.cache/retroinfer/jobs.sqlite): a store there
# would also hand one run's unfinished jobs to the next.
os.environ["RETROINFER_JOBS_DB"] = os.path.join(tempfile.mkdtemp(prefix="retroinfer-jobs-"), "jobs.sqlite")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
