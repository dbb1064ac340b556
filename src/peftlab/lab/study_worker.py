"""One worker process of ``peftlab sweep --workers K``: ``python -m peftlab.lab.study_worker
OUTPUT_DIR WORKER THREADS`` runs trials of the study in OUTPUT_DIR/study.db until its budget
is used up. A module of its own (not imported by peftlab) so that ``-m`` runs it only once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftlab.config import load_config
from peftlab.files import read_json
from peftlab.lab.search_space import space_from_dict
from peftlab.lab.study import STUDY_FILE, open_study, optimize


def main(argv: list[str]) -> int:
    out, worker, threads = Path(argv[0]), int(argv[1]), int(argv[2])
    settings = read_json(out / STUDY_FILE)
    config = load_config(base=settings["base"])  # validated again, as in the parent
    space = space_from_dict(settings["space"], str(out / STUDY_FILE))
    study = open_study(out, space, config.train.best_metric, worker=worker,
                       eval_every=config.train.eval_every)
    optimize(study, config.to_dict(), space, out, progress=False, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
