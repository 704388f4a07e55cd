"""The offline demo: the VPGTrans speed-up experiment in miniature, on CPU.

    python -m lavis_vpgtrans.demo [--out output/demo] [--seeds 0 1] [--epochs 10]

1. builds (or reuses) the toy world: the zoo's `demo` profile (synthetic image-caption / VQA
   data, OPT-family LMs at two sizes and a LLaMA-family LM pre-trained on its text, a tiny
   pre-trained ViT) and a BLIP-2 stage-1 Q-Former trained on it with `train.py`;
2. trains the source VL model (VPG + projector on opt-small), once for all seeds, on the
   world's source split (8x the images the transfers get, as the paper's source saw far more
   data than a transfer);
3. transfers to opt-large four ways -- train from scratch, VPG inherit, VPGTrans, VPGTrans
   without converter initialisation -- each validated every epoch on caption CIDEr and VQA
   accuracy;
4. transfers across families (opt-small -> LLaMA, a different tokenizer) with VPGTrans, next
   to a LLaMA trained from scratch;
5. prints the speed-up tables (paper Table 3 / Table 5), a Table 2-style warm-up table and the
   converter's quality, and writes convergence plots and results.json into the output dir.

Every run is a `train.py` process on a config of projects/vpgtrans/demo/experiment/; the
projector initialisations come from the converter CLI (python -m
lavis_vpgtrans.transfer.converter); the tables from lavis_vpgtrans.analysis.speedup.
"""
