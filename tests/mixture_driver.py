"""Runs train.py (as `python train.py ARGS`), alone or as a torchrun worker, counting which
training set of a `run.train_dataset_ratios` mixture each batch came from (for
test_own_data_mixture.py):

    MIXTURE_REPORT=DIR python tests/mixture_driver.py --cfg-path ... --options ...

Each rank writes DIR/rank<r>.json when train.py returns: {"draws": [batches drawn from loader
0, 1, ...], "datasets": [each loader's dataset class], "losses": [the training loss of each
step]}. The wrappers only observe: LAVIS's MultiIterLoader still draws, train_step still steps.
"""

import json
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset_class(loader) -> str:
    dataset = getattr(getattr(loader, "_dataloader", loader), "dataset", None)  # IterLoader(DataLoader)
    return f"{type(dataset).__module__}.{type(dataset).__qualname__}"


def install(record):
    from lavis.datasets.datasets.dataloader_utils import MultiIterLoader
    from lavis.tasks.base_task import BaseTask

    next_batch = MultiIterLoader.__next__

    def counting_next(self):
        loaders = self.loaders
        drawn = []

        class Spy:  # wraps each loader for one call, to see which one random.choices picked
            def __init__(self, i):
                self.i = i

            def __next__(self):
                drawn.append(self.i)
                return next(loaders[self.i])

        self.loaders = [Spy(i) for i in range(len(loaders))]
        try:
            batch = next_batch(self)
        finally:
            self.loaders = loaders
        if record["draws"] is None:
            record["draws"] = [0] * len(loaders)
            record["datasets"] = [_dataset_class(loader) for loader in loaders]
        record["draws"][drawn[0]] += 1
        return batch

    MultiIterLoader.__next__ = counting_next
    train_step = BaseTask.train_step

    def recording_train_step(self, model, samples):
        loss = train_step(self, model=model, samples=samples)
        record["losses"].append(float(loss))
        return loss

    BaseTask.train_step = recording_train_step


if __name__ == "__main__":
    record = {"draws": None, "datasets": None, "losses": []}
    install(record)
    sys.argv = [os.path.join(REPO, "train.py")] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    with open(os.path.join(os.environ["MIXTURE_REPORT"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(record, f)
