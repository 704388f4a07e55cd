"""Stage-1 projector initialisation for VPGTrans: input-embedding loading (`embeddings`), token
pairing across tokenizers (`pairing`), and the converter fit, quality report and projector
merge with its CLI (`converter`: python -m lavis_vpgtrans.transfer.converter --help)."""
