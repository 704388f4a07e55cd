import sys

from lavis_vpgtrans.demo.cli import entry

if __name__ == "__main__":
    if sys.argv[1:2] == ["pformer"]:  # the P-Former experiment (demo/pformer.py); else the VPGTrans demo
        from lavis_vpgtrans.demo.pformer import entry as pformer_entry

        sys.exit(pformer_entry())
    sys.exit(entry())
