"""``python -m bench.temporal_worker ADDRESS TASK_QUEUE``: the temporalio worker process.

A module of its own so the workflow is defined in ``bench.temporal_app``, never in
``__main__``, which the workflow sandbox could not re-import.
"""

from __future__ import annotations

import asyncio
import sys

from bench.temporal_app import serve

if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
