"""Prepare built-in datasets offline: python -m diffusion.data NAME [NAME ...] [--data_dir DIR]."""

import argparse

from diffusion.data.sources import DATASETS, default_data_dir, prepare


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", help=f"e.g. shapes/64x64; built-in: {sorted(DATASETS)}")
    parser.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR")
    args = parser.parse_args(argv)
    for name in args.names:
        path = prepare(name, default_data_dir(args.data_dir))
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
