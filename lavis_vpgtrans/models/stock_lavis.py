"""Stock LAVIS BLIP-2 classes (Blip2OPT, Blip2T5, ...) built from local files instead of downloads.

LAVIS 1.0.2's Blip2Base fetches EVA ViT-g (`create_eva_vit_g`) and bert-base-uncased (the Q-Former's
config, weights and tokenizer) from the internet. Inside `local_blip2_parts(vit_dir, bert_dir)`
those two, and only those, read an EVA-ViT directory (eva_vit.py) and a BERT
`save_pretrained` directory; the rest of the stock class runs as released. Used to compare our
models with stock LAVIS numerically (tests) and to measure stock LAVIS offline (benchmarks).
"""

from contextlib import contextmanager

BERT_NAME = "bert-base-uncased"
BERT_CLASSES = ("BertConfig", "BertLMHeadModel", "BertTokenizer")


@contextmanager
def local_blip2_parts(vit_dir: str, bert_dir: str):
    from lavis.models import eva_vit as lavis_eva_vit
    from lavis.models.blip2_models import blip2 as lavis_blip2

    from lavis_vpgtrans.models.eva_vit import load_eva_vit_dir

    def local_eva_vit(img_size, drop_path_rate, use_checkpoint, precision):
        vit = load_eva_vit_dir(vit_dir, img_size, drop_path_rate, use_checkpoint, precision="fp32")[0]
        if precision == "fp16":  # as create_eva_vit_g does it (layer norms stay fp32)
            lavis_eva_vit.convert_weights_to_fp16(vit)
        return vit

    def local_bert(cls):
        class FromLocalBert(cls):
            @classmethod
            def from_pretrained(klass, name, *args, **kwargs):
                return cls.from_pretrained(bert_dir if name == BERT_NAME else name, *args, **kwargs)
        return FromLocalBert

    saved = {name: getattr(lavis_blip2, name) for name in ("create_eva_vit_g", *BERT_CLASSES)}
    lavis_blip2.create_eva_vit_g = local_eva_vit
    for name in BERT_CLASSES:
        setattr(lavis_blip2, name, local_bert(saved[name]))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(lavis_blip2, name, value)
