"""P-Former on the tiny zoo: the model and its losses, the sentence builder, and the three
stages through train.py's entry point (stage 0 -> stage 1 -> stage 2, each reading the
previous stage's checkpoint)."""

import argparse
import json
import os

import pytest
import torch

from helpers import load_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "projects", "pformer", "demo")
TEXTS = ["a red circle at the top left",
         "there is a blue square at the bottom right and a green triangle at the top left"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention
    (several times faster under load); restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pf(plugin):
    """The P-Former modules, imported here (not at collection) so that their registry names
    appear only in sessions that run these tests."""
    from lavis_vpgtrans.tasks import pformer as pformer_task  # noqa: F401
    from lavis_vpgtrans.datasets import sentences
    from lavis_vpgtrans.models import blip2_qformer_pformer, pformer, pformer_encoder

    return argparse.Namespace(pformer=pformer, encoder=pformer_encoder, stage1=blip2_qformer_pformer,
                              sentences=sentences)


def load_pformer(model_type="tiny_opt_small"):
    return load_tiny("pformer", model_type)


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        lines = [line.strip() for line in f]
    return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]


def train_records(output_dir):
    return [r for r in read_log(output_dir) if "train_loss" in r]


# --------------------------------------------------------------------------- model and losses


@pytest.mark.parametrize("model_type", ["tiny_opt_small", "tiny_llama", "tiny_t5"])
def test_losses_and_prompt_shape_for_each_llm_family(pf, model_type):
    torch.manual_seed(0)
    model = load_pformer(model_type)
    model.train()
    out = model({"text_input": TEXTS})
    assert set(out) == {"loss", "loss_recon", "loss_contrast", "loss_vocab"}
    assert all(torch.isfinite(v) for v in out.values())
    expected = (out["loss_recon"] + model.contrastive_weight * out["loss_contrast"]
                + model.vocab_weight * out["loss_vocab"])
    assert torch.allclose(out["loss"], expected)

    out["loss"].backward()
    assert all(p.grad is None for p in model.llm_model.parameters())  # the LLM is frozen
    assert all(p.grad is not None for n, p in model.encoder.named_parameters()
               if not n.startswith("bert.pooler"))

    # One prompt length, whatever the text length: N x H_llm, the shape of projector(Q-Former).
    model.eval()
    short, long_ = model.encoder(["red"])[0], model.encoder([" and ".join(TEXTS * 2)])[0]
    assert short.shape == long_.shape == (1, 8, model.llm_model.config.hidden_size)


def test_vocab_regulariser_pulls_each_prompt_toward_its_nearest_embedding(pf):
    nearest_embedding_ids = pf.pformer.nearest_embedding_ids
    torch.manual_seed(0)
    table, vectors = torch.randn(37, 5), torch.randn(23, 5)
    expected = torch.cdist(vectors, table).argmin(1)
    assert torch.equal(nearest_embedding_ids(vectors, table), expected)
    assert torch.equal(nearest_embedding_ids(vectors, table, chunk_elements=37 * 4), expected)  # 6 chunks

    model = load_pformer()
    width = model.llm_model.config.hidden_size
    prompts = torch.randn(2, 8, width, requires_grad=True)
    table = model.llm_model.get_input_embeddings().weight
    loss = model.vocab_loss(prompts)
    flat = prompts.detach().reshape(-1, width)
    nearest = table[torch.cdist(flat, table).argmin(1)].detach()
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(flat, nearest).item(), rel=1e-5)
    loss.backward()
    # MSE toward a detached target: the gradient moves the prompt only, straight at its embedding.
    assert torch.allclose(prompts.grad.reshape(-1, width), 2 * (flat - nearest) / flat.numel(), atol=1e-7)
    assert table.grad is None


def test_simcse_loss_is_infonce_over_the_batch(pf):
    views = torch.eye(4)
    # positives at cosine 1, negatives at 0, temperature 0.05
    expected = -torch.log(torch.exp(torch.tensor(20.0)) / (torch.exp(torch.tensor(20.0)) + 3))
    assert pf.pformer.simcse_loss(views, views, 0.05).item() == pytest.approx(expected.item(), rel=1e-5)
    assert pf.pformer.simcse_loss(views, views.roll(1, 0), 0.05).item() > 19.9  # positives mismatched: ~ -log(1 / e^20)


def test_simcse_views_differ_in_training_and_the_llm_stays_in_eval(pf):
    model = load_pformer()
    tokens = model.encoder.tokenize(TEXTS)
    model.train()
    assert not model.llm_model.training and model.encoder.bert.training
    view1, view2 = model.contrastive_views(tokens)
    assert not torch.allclose(view1, view2)  # dropout on: two different views
    model.eval()
    view1, view2 = model.contrastive_views(tokens)
    assert torch.equal(view1, view2)


# --------------------------------------------------------------------------- sentence data


def test_sentence_builder_reads_txt_json_and_caption_files(pf, tmp_path):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    (tmp_path / "a.txt").write_text("A Red circle.\n\n  a blue square  \n")
    (tmp_path / "b.json").write_text(json.dumps(["a green triangle", {"text": "a red square"}]))
    (tmp_path / "train_caps.json").write_text(json.dumps(
        [{"image": "x.jpg", "caption": "a yellow circle", "image_id": 0}]))
    (tmp_path / "val_caps.json").write_text(json.dumps(
        [{"image": "y.jpg", "caption": ["a blue square", "a purple circle"], "image_id": 1}]))
    builder_cls = registry.get_builder_class("pformer_sentences")
    cfg = OmegaConf.load(builder_cls.default_config_path("toy")).datasets.pformer_sentences
    cfg.data_root = str(tmp_path)
    cfg.build_info.annotations = {"train": {"storage": ["a.txt", "b.json", "train_caps.json"]},
                                  "val": {"storage": "val_caps.json"}}
    datasets = builder_cls(cfg).build_datasets()
    train = [datasets["train"][i]["text_input"] for i in range(len(datasets["train"]))]
    # blip_caption lower-cases and strips punctuation; "a blue square" is in val, so dropped.
    assert train == ["a red circle", "a green triangle", "a red square", "a yellow circle"]
    assert [datasets["val"][i]["text_input"] for i in range(2)] == ["a blue square", "a purple circle"]
    batch = datasets["train"].collater([datasets["train"][0], datasets["train"][1]])
    assert batch["text_input"] == ["a red circle", "a green triangle"]

    cfg.build_info.annotations = {"train": {"storage": "missing.txt"}}
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        builder_cls(cfg).build_datasets()
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.jpg"}]))
    cfg.build_info.annotations = {"train": {"storage": "bad.json"}}
    with pytest.raises(ValueError, match="record 0"):
        builder_cls(cfg).build_datasets()


# --------------------------------------------------------------------------- stages via train.py


def run_stage0(out, model_type):
    """Stage 0 through train.py's entry point, with evaluate.py's on the untrained P-Former as
    the baseline (job "before")."""
    from lavis_vpgtrans.runners import launch

    options = ["--options", f"run.output_dir={out}", f"model.model_type={model_type}"]
    cfg = ["--cfg-path", os.path.join(DEMO, "tiny_stage0.yaml")]
    launch.evaluate_main(cfg + options + ["run.job_id=before", "run.test_splits=[val]"])
    launch.train_main(cfg + options + ["run.job_id=train", "run.max_epoch=4"])
    return out


@pytest.fixture(scope="module")
def stage0(pf, tmp_path_factory):
    """The OPT P-Former that stages 1 and 2 align to."""
    return run_stage0(tmp_path_factory.mktemp("stage0_opt"), "tiny_opt_small")


@pytest.fixture(scope="module")
def stage0_t5(pf, tmp_path_factory):
    return run_stage0(tmp_path_factory.mktemp("stage0_t5"), "tiny_t5")


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_stage0_lowers_the_loss_and_raises_held_out_token_accuracy(family, request):
    run = request.getfixturevalue({"opt": "stage0", "t5": "stage0_t5"}[family])
    before = [r for r in read_log(run / "before") if "test_val_token_acc" in r][0]["test_val_token_acc"]
    records = read_log(run / "train")
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_token_acc" in r]
    assert len(train) == len(val) == 4
    for r in train:  # each loss logged on its own
        assert {"train_loss_recon", "train_loss_contrast", "train_loss_vocab"} <= set(r)
    assert float(train[-1]["train_loss"]) < 0.9 * float(train[0]["train_loss"]), [r["train_loss"] for r in train]
    assert float(train[-1]["train_loss_recon"]) < float(train[0]["train_loss_recon"])
    assert val[-1]["val_token_acc"] > before + 0.05, (before, [r["val_token_acc"] for r in val])


def test_stage0_prompts_are_sentence_specific(stage0_t5, pf):
    """Held-out sentences are reconstructed better from their own predicted prompts than from
    other sentences' prompts: the P-Former encodes the sentence, not one generic prompt.
    (Shown with the tiny T5: the tiny OPT follows soft prompts too little, ~0.6 token
    accuracy even with prompts optimised per sentence, for four epochs to show it.)"""
    from lavis.common.registry import registry

    model = load_tiny("pformer", "tiny_t5", load_finetuned=True,
                      finetuned=str(stage0_t5 / "train" / "checkpoint_best.pth")).eval()
    builder = registry.get_builder_class("pformer_sentences")
    val = builder(builder.default_config_path("toy")).build_datasets()["val"]
    texts = [val[i]["text_input"] for i in range(len(val))]

    def accuracy(prompts):
        _, logits, labels = model.reconstruct(prompts, texts)
        scored = labels != -100
        return ((logits.argmax(-1) == labels) & scored).sum().item() / scored.sum().item()

    with torch.no_grad():
        prompts = model.encoder(texts)[0]
        own, others = accuracy(prompts), accuracy(prompts.roll(7, 0))
    assert own > others + 0.1, (own, others)


@pytest.fixture(scope="module")
def small_captions(tmp_path_factory, toy_zoo):
    """A 320-caption train file, so that the stage-1 / stage-2 runs take seconds."""
    path = tmp_path_factory.mktemp("captions") / "caption_train_small.json"
    with open(os.path.join(toy_zoo, "data", "annotations", "caption_train.json")) as f:
        path.write_text(json.dumps(json.load(f)[:320]))
    return path


def pformer_ckpt(stage0):
    return str(stage0 / "train" / "checkpoint_best.pth")


@pytest.fixture(scope="module")
def stage1(pf, stage0, small_captions, tmp_path_factory):
    from lavis_vpgtrans.runners import launch

    out = tmp_path_factory.mktemp("stage1")
    launch.train_main(["--cfg-path", os.path.join(DEMO, "tiny_stage1.yaml"), "--options",
                    f"run.output_dir={out}", "run.job_id=job", f"model.pformer_checkpoint={pformer_ckpt(stage0)}",
                    "model.align_weight=7.0",  # not the default 10: the weight must come from config
                    f"datasets.toy_caption.build_info.annotations.train.storage={small_captions}"])
    return out / "job"


def test_stage1_trains_with_alignment_from_config(stage1):
    train = train_records(stage1)
    assert len(train) == 2
    for r in train:
        parts = {k: float(r[f"train_loss_{k}"]) for k in ("itc", "itm", "lm", "align")}
        # LAVIS logs the total with 3 decimals
        assert float(r["train_loss"]) == pytest.approx(
            parts["itc"] + parts["itm"] + parts["lm"] + 7.0 * parts["align"], abs=2e-3)
    assert float(train[1]["train_loss_align"]) < float(train[0]["train_loss_align"])


def test_stage1_checkpoint_has_no_pformer_and_holds_the_projector(stage1):
    state = torch.load(stage1 / "checkpoint_1.pth", weights_only=True)["model"]
    assert not any(k.startswith("pformer.") for k in state)
    assert {"llm_proj.weight", "llm_proj.bias", "query_tokens", "itm_head.weight"} <= set(state)
    assert not any(k.startswith("visual_encoder.") for k in state)


@pytest.fixture(scope="module")
def stage2(pf, stage0, stage1, small_captions, tmp_path_factory):
    from lavis_vpgtrans.runners import launch

    out = tmp_path_factory.mktemp("stage2")
    stage1_ckpt = str(stage1 / "checkpoint_1.pth")
    launch.train_main(["--cfg-path", os.path.join(DEMO, "tiny_stage2.yaml"), "--options",
                    f"run.output_dir={out}", "run.job_id=job", f"model.pformer_checkpoint={pformer_ckpt(stage0)}",
                    f"model.vpg_checkpoint={stage1_ckpt}", f"model.projector_checkpoint={stage1_ckpt}",
                    "model.align_weight=50.0",  # not the default 100: the weight must come from config
                    f"datasets.toy_caption.build_info.annotations.train.storage={small_captions}"])
    return out / "job"


def test_stage2_trains_with_alignment_from_config(stage2):
    train = train_records(stage2)
    assert len(train) == 2
    for r in train:
        assert float(r["train_loss"]) == pytest.approx(
            float(r["train_loss_lm"]) + 50.0 * float(r["train_loss_align"]), abs=2e-3)
    assert float(train[1]["train_loss_align"]) < float(train[0]["train_loss_align"])


def test_stage2_checkpoint_holds_trainable_parameters_only(stage2, stage0):
    state = torch.load(stage2 / "checkpoint_1.pth", weights_only=True)["model"]
    model = load_tiny("blip2_opt_transfer", "tiny_opt_small", pformer_model_type="tiny_opt_small",
                      pformer_checkpoint=pformer_ckpt(stage0), align_weight=100.0)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == set(model.trainable_state_dict())
    assert not any(k.startswith("pformer.") for k in state)


# --------------------------------------------------------------------------- the frozen P-Former


def test_frozen_pformer_targets_are_fixed_during_training(pf, stage0, small_captions):
    """Both alignment models keep the P-Former frozen and in eval mode through train():
    two calls give the same targets, and none of its parameters train."""
    stage2_model = load_tiny("blip2_opt_transfer", "tiny_opt_small", pformer_model_type="tiny_opt_small",
                             pformer_checkpoint=pformer_ckpt(stage0), align_weight=100.0)
    stage1_model = load_tiny("blip2_qformer_pformer", "tiny_opt_small", pformer_checkpoint=pformer_ckpt(stage0))
    for model in (stage2_model, stage1_model):
        model.train()  # what LAVIS's runner calls every epoch
        assert not model.pformer.training and not any(m.training for m in model.pformer.modules())
        assert model.Qformer.training
        first = model.pformer.reference_prompts(TEXTS)
        assert torch.equal(first, model.pformer.reference_prompts(TEXTS))
        assert not any(p.requires_grad for p in model.pformer.parameters())
    assert not any(k.startswith("pformer.") for k in stage2_model.trainable_state_dict())

    # The targets are the trained P-Former's: the stage-0 model's own (eval) prompts.
    trained = load_tiny("pformer", "tiny_opt_small", load_finetuned=True, finetuned=pformer_ckpt(stage0)).eval()
    with torch.no_grad():
        assert torch.allclose(trained.encoder(TEXTS)[0], stage2_model.pformer.reference_prompts(TEXTS))


def test_stage2_forward_returns_each_loss(pf, stage0):
    from lavis.common.registry import registry

    model = load_tiny("blip2_opt_transfer", "tiny_opt_small", pformer_model_type="tiny_opt_small",
                      pformer_checkpoint=pformer_ckpt(stage0), align_weight=100.0)
    image = torch.randn(2, 3, 32, 32)
    out = model({"image": image, "text_input": TEXTS})
    assert set(out) == {"loss", "loss_lm", "loss_align"}
    assert torch.allclose(out["loss"], out["loss_lm"] + 100.0 * out["loss_align"])
    with pytest.raises(ValueError, match="caption samples"):
        model({"image": image, "text_input": ["question?"] * 2, "text_output": ["yes"] * 2})

    plain = load_tiny("blip2_opt_transfer", "tiny_opt_small")  # align_weight 0: no P-Former
    assert plain.pformer is None and set(plain({"image": image, "text_input": TEXTS})) == {"loss", "loss_lm"}
    assert registry.get_model_class("blip2_qformer_pformer").projector_name == "llm_proj"


def test_alignment_config_errors(pf, stage0):
    with pytest.raises(ValueError, match="pformer_checkpoint"):
        load_tiny("blip2_opt_transfer", "tiny_opt_small", pformer_model_type="tiny_opt_small", align_weight=100.0)
    with pytest.raises(ValueError, match="query tokens"):
        load_tiny("blip2_opt_transfer", "tiny_opt_small", num_query_token=4, pformer_model_type="tiny_opt_small",
                  pformer_checkpoint=pformer_ckpt(stage0), align_weight=100.0)
    from lavis_vpgtrans.common.checkpoint import CheckpointError

    # a P-Former trained for the 32-wide OPT cannot give targets for the 64-wide one: refused for
    # its LLM, and by shape even when the config claims the two LLMs are the same
    opt_large = dict(pformer_model_type="tiny_opt_large", pformer_checkpoint=pformer_ckpt(stage0), align_weight=100.0)
    with pytest.raises(CheckpointError, match="trained for LLM 'toy:opt-small'"):
        load_tiny("blip2_opt_transfer", "tiny_opt_large", **opt_large)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_tiny("blip2_opt_transfer", "tiny_opt_large", pformer_llm_model="toy:opt-small", **opt_large)


def test_alignment_refuses_a_pformer_trained_for_another_llm(pf, stage0, tmp_path):
    """The stage-0 checkpoint records its LLM; stages 1 and 2 refuse a P-Former recorded for
    another LLM (here one of the same width, which loads without any shape error), naming the
    file and both LLMs, unless `pformer_llm_model` states the recorded one is the same LLM."""
    from lavis_vpgtrans.common.checkpoint import CheckpointError, load_checkpoint_file
    from lavis_vpgtrans.common.paths import resolve_path

    enc = pf.encoder
    ckpt = load_checkpoint_file(pformer_ckpt(stage0))  # the safe (weights-only) loader
    assert enc.recorded_llm(ckpt) == "toy:opt-small"  # stage 0's model.llm_model, in the checkpoint

    def variant(name, llm=None):
        path = tmp_path / name
        config = {"model": {"arch": "pformer", "llm_model": llm}} if llm else None
        torch.save({"model": ckpt["model"], **({"config": config} if config else {})}, path)
        return str(path)

    llama = variant("pformer_llama.pth", "toy:llama")  # OPT-small's weights: the same width
    stage2 = dict(pformer_model_type="tiny_opt_small", align_weight=100.0)
    with pytest.raises(CheckpointError) as err:
        load_tiny("blip2_opt_transfer", "tiny_opt_small", pformer_checkpoint=llama, **stage2)
    message = str(err.value)
    assert llama in message and "'toy:llama'" in message and "'toy:opt-small'" in message
    assert "its llm_model" in message and "pformer_llm_model: 'toy:llama'" in message
    with pytest.raises(CheckpointError) as err:
        load_tiny("blip2_qformer_pformer", "tiny_opt_small", pformer_checkpoint=llama)
    message = str(err.value)
    assert llama in message and "'toy:llama'" in message and "'toy:opt-small'" in message
    assert "pformer_model_type 'tiny_opt_small'" in message

    # the matching P-Former is accepted; so is the other one when the config says it is the same LLM
    assert load_tiny("blip2_qformer_pformer", "tiny_opt_small", pformer_checkpoint=pformer_ckpt(stage0)).pformer
    assert load_tiny("blip2_opt_transfer", "tiny_opt_small", pformer_checkpoint=llama,
                     pformer_llm_model="toy:llama", **stage2).pformer is not None
    load = dict(model_type="tiny_opt_small", num_query_token=8, llm_width=32)
    with pytest.raises(CheckpointError, match="not for 'toy:vicuna' as model.pformer_llm_model states"):
        enc.load_frozen_pformer(checkpoint=llama, llm_model="toy:opt-small", pformer_llm_model="toy:vicuna", **load)

    # names compare as configured after normalisation: the same directory spelled otherwise matches
    opt_dir = resolve_path("toy:opt-small")
    os.symlink(opt_dir, tmp_path / "opt-link")
    by_path = variant("pformer_path.pth", opt_dir + "/")
    assert enc.load_frozen_pformer(checkpoint=by_path, llm_model=str(tmp_path / "opt-link"), **load) is not None
    with pytest.raises(CheckpointError, match="trained for LLM"):
        enc.load_frozen_pformer(checkpoint=by_path, llm_model="toy:opt-small", **load)
    assert enc.normalise_llm_name("/hf/hub/models--facebook--opt-2.7b/snapshots/abc123") == "facebook/opt-2.7b"
    assert enc.normalise_llm_name(" facebook/opt-2.7b/ ") == "facebook/opt-2.7b"

    # a checkpoint without the record: refused, unless the config names its LLM
    bare = variant("pformer_bare.pth")
    with pytest.raises(CheckpointError, match="does not record the LLM") as err:
        enc.load_frozen_pformer(checkpoint=bare, llm_model="toy:opt-small", **load)
    assert bare in str(err.value) and "pformer_llm_model: 'toy:opt-small'" in str(err.value)
    assert enc.load_frozen_pformer(checkpoint=bare, llm_model="toy:opt-small", pformer_llm_model="toy:opt-small",
                                   **load) is not None


# --------------------------------------------------------------------------- paper configs


@pytest.mark.parametrize("stage,arch,weight", [("stage0", "pformer", None),
                                                ("stage1", "blip2_qformer_pformer", 10.0),
                                                ("stage2", "blip2_opt_transfer", 100.0)])
def test_paper_configs(pf, stage, arch, weight):
    from lavis_vpgtrans.common.config import PluginConfig

    path = os.path.join(REPO, "projects", "pformer", f"{stage}.yaml")
    cfg = PluginConfig(argparse.Namespace(cfg_path=path, options=None))
    model, run = cfg.model_cfg, cfg.run_cfg
    assert model.arch == arch and run.task == "pformer_pretrain"
    assert (float(run.init_lr), float(run.min_lr), float(run.warmup_lr)) == (1e-4, 1e-5, 1e-6)
    if stage == "stage0":
        assert (run.max_epoch, run.warmup_steps, model.num_query_token, model.temperature) == (5, 2000, 32, 0.05)
        assert model.llm_model == "facebook/opt-2.7b" and model.bert_model == "bert-base-uncased"
    else:
        assert model.align_weight == weight and model.pformer_model_type == "opt2.7b"
        assert (run.max_epoch, run.warmup_steps) == (10, 5000 if stage == "stage1" else 2000)
        assert set(cfg.datasets_cfg) == {"vpgtrans_coco_caption_train", "vpgtrans_vg_caption",
                                         "vpgtrans_sbu_caption", "conceptual_caption_3m"}  # the paper's 4M
    for value in (model.get("pformer_checkpoint"), model.get("vpg_checkpoint"), run.output_dir):
        assert value is None or not os.path.isabs(value)


def test_stage1_config_trains_with_the_blip2_image_transform(pf):
    """Stage 1 follows the authors and LAVIS's BLIP-2 stage 1: blip2_image_train (crop + flip,
    no RandAugment) for every dataset, at the configured size."""
    from lavis.common.registry import registry
    from lavis.processors.blip_processors import Blip2ImageTrainProcessor
    from lavis_vpgtrans.common.config import PluginConfig

    cfg = PluginConfig(argparse.Namespace(cfg_path=os.path.join(REPO, "projects", "pformer", "stage1.yaml"),
                                          options=None))
    for name, dataset in cfg.datasets_cfg.items():
        train = dataset.vis_processor.train
        assert (train.name, train.image_size) == ("blip2_image_train", 224), name
    assert registry.get_processor_class("blip2_image_train") is Blip2ImageTrainProcessor
