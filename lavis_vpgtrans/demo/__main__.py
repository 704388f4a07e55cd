import sys

from lavis_vpgtrans.demo.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
