"""Dataset names -> prepared tfds builders -> random-access array_record data sources.

Built-in names (`DATASETS`) are prepared locally on first use; any other name must already be
prepared as array_record under the data dir (we never download). Prepared data is always read
through `builder_from_files`, which needs neither builder code nor TensorFlow.
"""

import os

import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters, read_only_builder

from diffusion.data.builders import Digits
from diffusion.data.gmm import Gmm, gmm_from_metadata
from diffusion.data.shapes import Shapes

# name -> tfds builder class; "name/config" picks a builder config (default: the first one).
DATASETS = {"digits": Digits, "gmm": Gmm, "shapes": Shapes}


def default_data_dir(data_dir: str | None = None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds's default).

    An empty string means "default" (configs use "" so the CLI can override it), never the
    current directory."""
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _builtin(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    base, _, config = name.partition("/")
    cls = DATASETS[base]
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if config and config not in configs:
        raise ValueError(f"Unknown config {config!r} for dataset {base!r}; valid: {configs}")
    return cls(config=config or configs[0], data_dir=data_dir, file_format="array_record")


def prepare(name: str, data_dir: str | None = None) -> str:
    """Prepare a built-in dataset (e.g. "shapes/64x64") as array_record; returns its directory.

    Does nothing if it is already prepared. Offline and TensorFlow-free.
    """
    base = name.partition("/")[0]
    if base not in DATASETS:
        raise ValueError(
            f"prepare() builds only built-in datasets {sorted(DATASETS)}, got {name!r}"
        )
    builder = _builtin(name, default_data_dir(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return os.fspath(builder.data_dir)


def _prepared_names(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        return []
    skip = {"downloads"}
    return sorted(n for n in os.listdir(data_dir) if n not in skip and not n.startswith("."))


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """A read-only tfds builder for `name` (built-ins are prepared first if needed)."""
    data_dir = default_data_dir(data_dir)
    if name.partition("/")[0] in DATASETS:
        prepare(name, data_dir)
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Dataset {name!r} is not built in (built-in: {sorted(DATASETS)}) and is not prepared "
            f"in {data_dir} (found there: {_prepared_names(data_dir)}). Nothing is downloaded at "
            "run time; prepare a tfds dataset beforehand (needs network and TensorFlow):\n"
            f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
            "or set TFDS_DATA_DIR / data_dir to where it is prepared."
        ) from None
    fmt = builder.info.file_format
    if fmt is not None and file_adapters.FileFormat(fmt) != file_adapters.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"Dataset {name!r} in {data_dir} is stored as {fmt}, but grain needs array_record. "
            f"Convert it: tfds convert_format --root_data_dir={data_dir} --out_file_format="
            "array_record"
        )
    return builder


def load_source(name: str, split: str, data_dir: str | None = None):
    """Random-access data source (tfds ArrayRecordDataSource) of decoded numpy examples."""
    builder = load_builder(name, data_dir)
    base_split = split.partition("[")[0]
    if base_split not in builder.info.splits:
        raise ValueError(f"Unknown split {split!r} of {name!r}; valid: {list(builder.info.splits)}")
    return builder.as_data_source(split=split)


def load_gmm(name: str = "gmm/gmm2d", data_dir: str | None = None):
    """The exact `analytic.GMM` behind a prepared gmm dataset (from its metadata)."""
    if name.partition("/")[0] != "gmm":
        raise ValueError(f"load_gmm needs a gmm dataset such as 'gmm/d8', got {name!r}")
    return gmm_from_metadata(load_builder(name, data_dir).info.metadata)
