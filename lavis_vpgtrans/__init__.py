"""lavis-vpgtrans: VPGTrans and P-Former as a LAVIS plugin."""
