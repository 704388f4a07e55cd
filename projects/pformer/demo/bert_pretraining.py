"""Does a toy BERT pre-trained the way BERT is (masked LM + next sentence prediction) help the
P-Former demo's stage 0? (issue 21, item 1: "a text encoder that tells sentences apart")

    .venv/bin/python projects/pformer/demo/bert_pretraining.py --out DIR [--steps 300] [--seed 41]
                     [--stage0-epochs 5]

On the demo world (the zoo's demo profile, built on first use), with pinned CPU kernels:
1. pre-trains a BertForPreTraining of the zoo's toy BERT (its config, vocabulary and
   initialisation recipe) on documents of the toy world -- a terse scene description, a caption
   of the scene, a question about it -- with MLM (15 % of the tokens, 80 / 10 / 10) + NSP (the
   next line of the document, or a line of another document), as bert-base-uncased was
   pre-trained; written to DIR/bert-pretrained in that checkpoint layout (bert.*,
   cls.predictions.*, cls.seq_relationship.*);
2. measures both BERTs before any P-Former training: the mean cosine between different
   held-out sentences' [CLS], the same after removing the mean [CLS], a linear probe that reads
   each grid cell's content (empty or colour x shape) from [CLS] (fresh scenes' canonical
   captions, 3,000 to train, 1,000 to test), and the mean cosine among the colour / shape /
   position words' input embeddings;
3. trains the demo's stage-0 P-Former (stage0.yaml through train.py) from each, and measures
   its reconstruction of the 160 held-out val sentences (demo.prompt_reconstruction: own vs
   another sentence's prompts, teacher-forced and greedy content-word accuracy).

Measured (demo world, ZOO_VERSION 9, the stage-0 P-Former's seed 0; the first two rows are this
script's output with the defaults: 199 s of CPU, 7.2 min on 2 cores shared with other jobs):

| BERT | [CLS] cosine | centred | probe (majority 0.495) | colour / shape / position words' cosine | stage 0 (5 epochs): content own / other | greedy own / other |
|---|---|---|---|---|---|---|
| the zoo's (random init) | 0.996 | 0.006 | 0.881 | 0.027 / 0.047 / 0.047 | 0.862 / 0.467 | 0.854 / 0.367 |
| MLM + NSP, 300 steps, seed 41 | 0.992 | 0.010 | 0.875 | 0.293 / 0.321 / 0.293 | 0.787 / 0.460 | 0.788 / 0.383 |
| MLM + NSP, 600 steps, seed 41 | 0.977 | 0.019 | 0.874 | 0.498 / 0.514 / 0.386 | 0.779 / 0.471 | 0.771 / 0.379 |
| MLM + NSP, 300 steps, seed 42 | 0.989 | 0.042 | 0.870 | 0.291 / 0.339 / 0.308 | 0.778 / 0.446 | 0.762 / 0.366 |

(NSP accuracy over the last 20 steps 0.84, 0.88, 0.85; 300 steps took 29 s at load 1.4.)
Another stage-0 seed (run.seed=1): the zoo's BERT 0.855 / 0.454, greedy 0.859 / 0.371; the
300-step seed-41 BERT 0.763 / 0.452, greedy 0.756 / 0.351. With twice the stage-0 epochs (10,
~1,840 steps) the two meet: the zoo's BERT 0.892 / 0.475, greedy 0.900 / 0.386; the 300-step
seed-41 BERT 0.905 / 0.463, greedy 0.902 / 0.379.

So at the demo's stage-0 budget the pre-trained BERT reconstructs worse (content-word accuracy
-0.08 to -0.09 on both stage-0 seeds, greedy likewise; the other sentence's prompts unchanged),
and it is neutral only with twice the budget. The raw [CLS] cosine (0.996) misled: it is a
shared offset (0.006 once the mean [CLS] is removed), and a linear probe reads the scene from
the random BERT's [CLS] as well as from the pre-trained ones'. The toy text is templated, and a
random 2-layer encoder's features already separate its sentences; what MLM adds is that words
which fill the same slots (red / blue, circle / square) get similar embeddings (cosine 0.03 ->
0.29-0.50), which the P-Former has to undo before its prompts name the right colour.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STAGE0 = os.path.join("projects", "pformer", "demo", "experiment", "stage0.yaml")


def bert_pretraining_batch(tokenizer, documents, rng, batch_size, mask_prob=0.15):
    """One BERT pre-training batch (Devlin et al. 2019): sentence pairs "[CLS] A [SEP] B [SEP]"
    from `documents` (lists of lines), B the line after A in A's document for half the pairs
    (next sentence label 0) and a line of another document for the others (label 1); 15 % of the
    tokens masked for MLM, of those 80 % [MASK], 10 % a random token, 10 % unchanged."""
    import torch

    special = set(tokenizer.all_special_ids)
    words = [i for i in range(len(tokenizer)) if i not in special]
    rows, types, next_labels = [], [], []
    for _ in range(batch_size):
        doc = documents[rng.randrange(len(documents))]
        i = rng.randrange(len(doc) - 1)
        if rng.random() < 0.5:
            b, label = doc[i + 1], 0
        else:
            other = documents[rng.randrange(len(documents))]
            while other is doc:
                other = documents[rng.randrange(len(documents))]
            b, label = other[rng.randrange(len(other))], 1
        enc = tokenizer(doc[i], b)
        rows.append(enc.input_ids)
        types.append(enc.token_type_ids)
        next_labels.append(label)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    token_types = torch.tensor([t + [0] * (width - len(t)) for t in types])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.full_like(ids, -100)
    inputs = ids.clone()
    for r, row in enumerate(rows):
        for t, token in enumerate(row):
            if token in special or rng.random() >= mask_prob:
                continue
            labels[r, t] = token
            draw = rng.random()
            if draw < 0.8:
                inputs[r, t] = tokenizer.mask_token_id
            elif draw < 0.9:
                inputs[r, t] = rng.choice(words)
    return dict(input_ids=inputs, token_type_ids=token_types, attention_mask=mask, labels=labels,
                next_sentence_label=torch.tensor(next_labels))


def pretrain_bert(model, tokenizer, documents, steps=300, batch_size=64, lr=1e-3, warmup_steps=30, seed=0) -> dict:
    """MLM + NSP (BertForPreTraining), AdamW, linear warm-up and decay; returns the last step's
    losses and the NSP accuracy over the last 20 steps."""
    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / (warmup_steps + 1), max(0.0, (steps - s) / (steps - warmup_steps))))
    model.train()
    right = seen = 0
    for step in range(steps):
        batch = bert_pretraining_batch(tokenizer, documents, rng, batch_size)
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step >= steps - 20:
            right += int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum())
            seen += batch_size
    model.eval()
    with torch.no_grad():
        mlm = F.cross_entropy(out.prediction_logits.flatten(0, 1), batch["labels"].flatten())
        nsp = F.cross_entropy(out.seq_relationship_logits, batch["next_sentence_label"])
    return {"mlm_loss": mlm.item(), "nsp_loss": nsp.item(), "nsp_acc": right / seen}


def cls_states(path, texts):
    import torch
    from transformers import BertModel, BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    with torch.no_grad():
        batches = [tokenizer(texts[i:i + 256], padding=True, return_tensors="pt") for i in range(0, len(texts), 256)]
        return torch.cat([model(**batch).last_hidden_state[:, 0] for batch in batches])


def scene_captions(n, seed):
    """Canonical captions of fresh scenes and each grid cell's content (0 empty, else colour x shape)."""
    import torch

    from lavis_vpgtrans.toy import world

    rng = random.Random(seed)
    cells, colors, shapes = sorted(world.CELLS), sorted(world.COLORS), list(world.SHAPES)
    texts, labels = [], []
    for _ in range(n):
        scene = world.sample_scene(rng)
        texts.append(world.captions(scene, rng)[0])
        label = [0] * len(cells)
        for thing in scene:
            label[cells.index(thing.cell)] = 1 + colors.index(thing.color) * len(shapes) + shapes.index(thing.shape)
        labels.append(label)
    return texts, torch.tensor(labels)


def encoder_measures(path, held_out) -> dict:
    """[CLS] cosine between held-out sentences (raw and mean-removed), the linear probe of the
    cells' content from [CLS], and the content words' embedding cosine."""
    import torch
    import torch.nn.functional as F
    from transformers import BertModel, BertTokenizer

    from lavis_vpgtrans.toy import world

    def mean_offdiag(x):
        sim = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
        return float(sim[~torch.eye(len(x), dtype=torch.bool)].mean())

    cls = cls_states(path, held_out)
    train_texts, train_y = scene_captions(3000, 1234)
    test_texts, test_y = scene_captions(1000, 5678)
    x_train, x_test = cls_states(path, train_texts), cls_states(path, test_texts)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    classes = 1 + len(world.COLORS) * len(world.SHAPES)
    torch.manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], train_y.shape[1] * classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):
        loss = F.cross_entropy(head(x_train).view(-1, classes), train_y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probe = float((head(x_test).view(len(x_test), -1, classes).argmax(-1) == test_y).float().mean())
    tokenizer = BertTokenizer.from_pretrained(path)
    table = BertModel.from_pretrained(path, add_pooling_layer=False).embeddings.word_embeddings.weight.detach()
    words = {"colour": sorted(world.COLORS), "shape": list(world.SHAPES),
             "position": ["top", "bottom", "left", "right"]}
    return {"cls_cosine": mean_offdiag(cls), "cls_cosine_centred": mean_offdiag(cls - cls.mean(0)),
            "probe_cell_content_acc": probe, "probe_majority": float((test_y == 0).float().mean()),
            **{f"{k}_word_cosine": mean_offdiag(table[tokenizer.convert_tokens_to_ids(v)]) for k, v in words.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--zoo", default=None, help="the demo world (default: the cache's toy_zoo_demo)")
    p.add_argument("--steps", type=int, default=300, help="BERT pre-training steps (batch 64)")
    p.add_argument("--seed", type=int, default=41, help="pre-training seed (and of its documents)")
    p.add_argument("--documents", type=int, default=6000)
    p.add_argument("--stage0-epochs", type=int, default=5)
    p.add_argument("--no-baseline", action="store_true", help="measure the pre-trained BERT only")
    args = p.parse_args(argv)

    from lavis_vpgtrans.common import kernels

    if os.environ.get(kernels.PIN_FLAG) != "1":  # the figures on any x86-64 machine with AVX2
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                  kernels.pinned_env())
    import torch
    from transformers import BertConfig, BertForPreTraining, BertTokenizer

    from lavis_vpgtrans.demo.pformer import held_out_sentences
    from lavis_vpgtrans.demo.prompt_reconstruction import PromptedLM, reconstruction
    from lavis_vpgtrans.models.pformer_encoder import load_frozen_pformer
    from lavis_vpgtrans.toy import world, zoo

    print(kernels.describe(), flush=True)
    zoo_dir = zoo.ensure_zoo(args.zoo or zoo.default_zoo_dir("demo"), profile="demo")
    os.environ["VPGTRANS_TOY_ZOO"] = zoo_dir
    out = os.path.abspath(args.out)
    random_bert, pretrained = os.path.join(zoo_dir, "bert"), os.path.join(out, "bert-pretrained")
    shutil.copytree(random_bert, pretrained, dirs_exist_ok=True)
    t = time.time()
    with zoo.deterministic_build():
        torch.manual_seed(40)  # the zoo's recipe: seed + 40, the zoo's config
        model = BertForPreTraining(BertConfig.from_pretrained(random_bert))
        documents = world.corpus_documents(args.documents, seed=args.seed, questions_per_doc=1)
        pretraining = pretrain_bert(model, BertTokenizer.from_pretrained(random_bert), documents, steps=args.steps,
                                    seed=args.seed)
    model.save_pretrained(pretrained)
    pretraining["seconds"] = time.time() - t
    print(f"pre-trained: {json.dumps(pretraining)}", flush=True)

    held_out = held_out_sentences(zoo_dir)
    bert_dirs = {"the zoo's (random init)": random_bert, f"MLM + NSP, {args.steps} steps, seed {args.seed}": pretrained}
    if args.no_baseline:
        bert_dirs.pop("the zoo's (random init)")
    env = kernels.pinned_env(dict(os.environ, VPGTRANS_TOY_ZOO=zoo_dir))
    procs = {name: subprocess.Popen([sys.executable, "train.py", "--cfg-path", STAGE0, "--options",
                                     f"run.output_dir={os.path.join(out, f'stage0_{i}')}", "run.job_id=run",
                                     f"run.max_epoch={args.stage0_epochs}", f"model.bert_model={path}"],
                                    cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, (name, path) in enumerate(bert_dirs.items())}
    results = {name: {"encoder": encoder_measures(path, held_out)} for name, path in bert_dirs.items()}
    lm = PromptedLM("toy:llama")
    for i, (name, proc) in enumerate(procs.items()):
        _, err = proc.communicate()
        if proc.returncode:
            print(err.decode()[-3000:], file=sys.stderr)
            return 1
        checkpoint = os.path.join(out, f"stage0_{i}", "run", f"checkpoint_{args.stage0_epochs - 1}.pth")
        results[name]["reconstruction"] = reconstruction(load_frozen_pformer("tiny_llama", checkpoint, 8), lm, held_out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "pretraining": pretraining, "results": results}, f, indent=2)
    majority = next(iter(results.values()))["encoder"]["probe_majority"]
    print(f"\n| BERT | [CLS] cosine | centred | probe (majority {majority:.3f}) "
          f"| colour / shape / position words' cosine | stage 0 ({args.stage0_epochs} epochs): content own / other "
          f"| greedy own / other |\n|---|---|---|---|---|---|---|")
    for name, r in results.items():
        e, own, other = r["encoder"], r["reconstruction"]["own"], r["reconstruction"]["other"]
        print(f"| {name} | {e['cls_cosine']:.3f} | {e['cls_cosine_centred']:.3f} | {e['probe_cell_content_acc']:.3f} "
              f"| {e['colour_word_cosine']:.3f} / {e['shape_word_cosine']:.3f} / {e['position_word_cosine']:.3f} "
              f"| {own['content_acc']:.3f} / {other['content_acc']:.3f} "
              f"| {own['greedy_content_acc']:.3f} / {other['greedy_content_acc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
