"""Registration networks: the uniGradICON architecture, its configuration and its weights.

``build_network(NetworkConfig.unigradicon())`` gives the released architecture, into which
the official ``Step_2_final.trch`` loads unchanged (:func:`load_weights`); smaller
configurations use the same code. All maps are pull-backs in normalised coordinates (see
:mod:`regpipe.networks.gradicon`).
"""

from regpipe.networks.checkpoint import (
    Checkpoint,
    infer_config,
    load_weights,
    network_from_file,
    read_checkpoint,
    save_weights,
)
from regpipe.networks.gradicon import (
    ComposedMap,
    CoordinateMap,
    DisplacementMap,
    Downsample,
    FieldToMap,
    NetworkConfig,
    RegistrationNetwork,
    TwoStep,
    build_network,
    warp_normalised,
)
from regpipe.networks.unet import UNet2, min_unet_input_size

__all__ = [
    "Checkpoint",
    "ComposedMap",
    "CoordinateMap",
    "DisplacementMap",
    "Downsample",
    "FieldToMap",
    "NetworkConfig",
    "RegistrationNetwork",
    "TwoStep",
    "UNet2",
    "build_network",
    "infer_config",
    "load_weights",
    "min_unet_input_size",
    "network_from_file",
    "read_checkpoint",
    "save_weights",
    "warp_normalised",
]
