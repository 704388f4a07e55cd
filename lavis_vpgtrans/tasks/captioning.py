"""Zero-shot caption evaluation (COCO Karpathy test, NoCaps val) with the COCO caption metrics.

LAVIS's `captioning` task downloads the Karpathy ground truth from a hard-coded URL into
`cache_root` and runs `COCOEvalCap.evaluate`, which also runs SPICE (a Stanford CoreNLP
download). Here the ground truth is the dataset config's `build_info.annotations.<split>.coco_gt`
(resolved by our builders) and the metrics are computed directly with pycocoevalcap's scorers:
PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D). SPICE runs only when its CoreNLP jars are
already installed; otherwise it is reported as unavailable and left out of the metrics.

NoCaps: when the ground-truth images carry a `domain` field (nocaps_val_4500_captions.json
does), CIDEr is also reported per domain, each domain scored on its own images (its own
document frequencies), as the NoCaps evaluation server does.
"""

import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask

from lavis_vpgtrans.tasks.base import EvalTaskMixin, eval_splits

GT_KEY = "coco_gt"
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
SPICE_UNAVAILABLE = "SPICE: unavailable offline (needs Stanford CoreNLP download)"
# The scorers `run.caption_metrics` may choose from (SPICE has its own `spice` switch).
CAPTION_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")


def load_coco_gt(path: str):
    """COCO-format caption ground truth -> ({image_id: [captions]}, {image_id: domain} or None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption ground-truth file not found: {path}")
    with open(path) as f:
        gt = json.load(f)
    for key in ("images", "annotations"):
        if key not in gt:
            raise ValueError(f"{path}: not a COCO caption ground truth (no {key!r} list)")
    refs: Dict[int, List[str]] = {int(img["id"]): [] for img in gt["images"]}
    for ann in gt["annotations"]:
        image_id = int(ann["image_id"])
        if image_id not in refs:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to image {image_id}, "
                             "which is not in its `images` list")
        refs[image_id].append(ann["caption"])
    empty = [i for i, caps in refs.items() if not caps]
    if empty:
        raise ValueError(f"{path}: {len(empty)} images have no reference caption (e.g. {empty[:5]})")
    domains = None
    if any("domain" in img for img in gt["images"]):
        domains = {int(img["id"]): img.get("domain") for img in gt["images"]}
    return refs, domains


def load_caption_results(path: str) -> Dict[int, str]:
    """[{"image_id", "caption"}] -> {image_id: caption}; one caption per image."""
    with open(path) as f:
        results = json.load(f)
    preds: Dict[int, str] = {}
    for res in results:
        image_id = int(res["image_id"])
        if image_id in preds:
            raise ValueError(f"{path}: more than one caption for image {image_id}")
        preds[image_id] = res["caption"]
    return preds


_METEOR = None


def _meteor():
    """One METEOR Java process per Python process: starting it (loading its paraphrase table)
    takes seconds, scoring a batch of captions much less."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def spice_available() -> bool:
    """Whether pycocoevalcap's SPICE can run without downloading Stanford CoreNLP."""
    import pycocoevalcap.spice.spice as spice_module

    lib = os.path.join(os.path.dirname(spice_module.__file__), "lib")
    return all(os.path.isfile(os.path.join(lib, jar)) for jar in
               ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"))


def _check_coverage(refs, preds):
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    if missing or extra:
        raise ValueError(
            f"caption results do not match the ground truth: {len(missing)} ground-truth images "
            f"without a caption (e.g. {missing[:5]}), {len(extra)} captions for images not in "
            f"the ground truth (e.g. {extra[:5]})")


def check_caption_metrics(names: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The scorers to run: `names` (a subset of CAPTION_METRICS), or all of them for None."""
    if names is None:
        return CAPTION_METRICS
    names = tuple(names)
    unknown = [n for n in names if n not in CAPTION_METRICS]
    if unknown or not names:
        raise ValueError(f"caption_metrics {list(names)}: choose a non-empty subset of {list(CAPTION_METRICS)}"
                         + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else ""))
    return names


def score_captions(refs: Dict[int, List[str]], preds: Dict[int, str],
                   domains: Optional[Dict[int, str]] = None, spice: str = "auto",
                   metrics_to_run: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """The COCO caption metrics of `preds` against `refs` (same image ids).

    Returns Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (pycocoevalcap's scale, CIDEr 1.0 = 100 in
    papers), plus CIDEr_<domain> for each domain when `domains` is given, and SPICE only
    when `spice` is "auto"/True and its CoreNLP jars are installed. `metrics_to_run` (default
    all of CAPTION_METRICS) leaves the others out, e.g. METEOR's Java process in a quick run.
    """
    metrics_to_run = check_caption_metrics(metrics_to_run)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check_coverage(refs, preds)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in refs.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in preds.items()})
    if set(gts) != set(refs) or set(res) != set(preds):
        raise RuntimeError("PTB tokenizer output lost images; check captions for unusual characters")

    metrics: Dict[str, float] = {}
    if "Bleu" in metrics_to_run:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, value in enumerate(bleu, start=1):
            metrics[f"Bleu_{n}"] = float(value)
    if "METEOR" in metrics_to_run:
        metrics["METEOR"] = float(_meteor().compute_score(gts, res)[0])
    if "ROUGE_L" in metrics_to_run:
        metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics_to_run:
        metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])

    if domains is not None and "CIDEr" in metrics_to_run:
        for domain in NOCAPS_DOMAINS:
            ids = [i for i in gts if domains.get(i) == domain]
            if not ids:
                logging.warning("no ground-truth images in domain %r", domain)
                continue
            # Per-domain CIDEr uses that domain's own document frequencies.
            cider, _ = Cider().compute_score({i: gts[i] for i in ids}, {i: res[i] for i in ids})
            metrics[f"CIDEr_{domain}"] = float(cider)
            logging.info("%s: %d images, CIDEr %.4f", domain, len(ids), cider)

    if spice in (True, "auto", "true") and spice_available():
        from pycocoevalcap.spice.spice import Spice

        metrics["SPICE"] = float(Spice().compute_score(gts, res)[0])
    elif spice in (True, "true"):
        logging.warning(SPICE_UNAVAILABLE)
    elif spice == "auto":
        logging.warning(SPICE_UNAVAILABLE + "; reported without SPICE")
    return metrics


def evaluate_caption_file(gt_file: str, result_file: str, spice: str = "auto",
                          metrics_to_run: Optional[Sequence[str]] = None) -> Dict[str, float]:
    refs, domains = load_coco_gt(gt_file)
    return score_captions(refs, load_caption_results(result_file), domains=domains, spice=spice,
                          metrics_to_run=metrics_to_run)


@registry.register_task("vpgtrans_captioning")
class VPGTransCaptionTask(EvalTaskMixin, CaptionTask):
    """Caption generation + COCO caption metrics against `build_info.annotations.<split>.coco_gt`.

    run_cfg: num_beams, max_len, min_len, evaluate, report_metric (default true),
    agg_metric (default CIDEr), spice ("auto": only if CoreNLP is installed; false: never),
    caption_metrics (default: all of Bleu, METEOR, ROUGE_L, CIDEr; e.g. [Bleu, CIDEr] skips
    METEOR's Java process when a quick run validates every epoch).
    """

    def __init__(self, num_beams, max_len, min_len, evaluate, report_metric=True,
                 agg_metric="CIDEr", spice="auto", caption_metrics=None):
        super().__init__(num_beams=num_beams, max_len=max_len, min_len=min_len,
                         evaluate=evaluate, report_metric=report_metric)
        self.agg_metric = agg_metric
        self.spice = spice
        self.caption_metrics = check_caption_metrics(caption_metrics)
        # fail at setup, not after the first evaluation pass
        scorer = next((m for m in CAPTION_METRICS if agg_metric == m or agg_metric.startswith(m + "_")), None)
        if report_metric and scorer is not None and scorer not in self.caption_metrics:
            raise ValueError(f"agg_metric {agg_metric!r} needs the {scorer} scorer, which caption_metrics "
                             f"{list(self.caption_metrics)} leaves out")
        self.gt_files: Dict[str, str] = {}

    @classmethod
    def setup_task(cls, cfg):
        run_cfg = cfg.run_cfg
        return cls(num_beams=run_cfg.num_beams, max_len=run_cfg.max_len, min_len=run_cfg.min_len,
                   evaluate=run_cfg.evaluate, report_metric=run_cfg.get("report_metric", True),
                   agg_metric=run_cfg.get("agg_metric", "CIDEr"), spice=run_cfg.get("spice", "auto"),
                   caption_metrics=run_cfg.get("caption_metrics", None))

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        owner: Dict[str, str] = {}
        for name, dcfg in self.dataset_configs.items():
            # streams (webdataset shards) have no annotation files and no ground truth
            for split, ann in (dcfg.build_info.get("annotations", None) or {}).items():
                gt = ann.get(GT_KEY, None)
                if not gt:
                    continue
                if split in self.gt_files and self.gt_files[split] != gt:
                    raise ValueError(
                        f"datasets {owner[split]!r} and {name!r} both give a {split!r} caption ground "
                        f"truth ({self.gt_files[split]} vs {gt}); evaluate one caption dataset per run")
                self.gt_files[split], owner[split] = gt, name
        if self.report_metric:
            for split in eval_splits(cfg):
                if split not in self.gt_files:
                    raise ValueError(
                        f"split {split!r} is evaluated but no dataset gives its ground truth: set "
                        f"`build_info.annotations.{split}.{GT_KEY}` (a COCO-format caption file) in "
                        f"the dataset config of {', '.join(self.dataset_configs)}")
        return datasets

    def valid_step(self, model, samples):
        captions = model.generate(samples, use_nucleus_sampling=False, num_beams=self.num_beams,
                                  max_length=self.max_len, min_length=self.min_len)
        return [{"caption": caption, "image_id": int(img_id)}
                for caption, img_id in zip(captions, samples["image_id"])]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        result_file = self.save_result(result=val_result, result_dir=registry.get_path("result_dir"),
                                       filename="{}_epoch{}".format(split_name, epoch),
                                       remove_duplicate="image_id")
        self.warn_if_empty(result_file, "caption", "captions", split_name, epoch)
        if not self.report_metric:
            return {"agg_metrics": 0.0}
        return self._report_metrics(eval_result_file=result_file, split_name=split_name)

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        if split_name not in self.gt_files:
            raise ValueError(f"no caption ground truth for split {split_name!r} "
                             f"(build_info.annotations.{split_name}.{GT_KEY})")
        metrics = evaluate_caption_file(self.gt_files[split_name], eval_result_file, spice=self.spice,
                                        metrics_to_run=self.caption_metrics)
        if self.agg_metric not in metrics:
            raise KeyError(f"agg_metric {self.agg_metric!r} is not among the metrics {sorted(metrics)}")
        for name, value in metrics.items():
            logging.info("%s %s: %.4f", split_name, name, value)
        self.write_eval_log(split_name, metrics)
        return {**metrics, "agg_metrics": metrics[self.agg_metric]}
