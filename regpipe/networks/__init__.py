"""Registration networks: the uniGradICON architecture, its configuration and its weights.

``build_network(NetworkConfig.unigradicon())`` gives the released architecture, into which
the official ``Step_2_final.trch`` loads unchanged (:func:`load_weights`); smaller
configurations use the same code. :class:`ConditionalRegistrationNetwork` adds a controller
that steers the flow heads by region, pair type and regularisation weight. All maps are
pull-backs in normalised coordinates (see :mod:`regpipe.networks.gradicon`).
"""

from regpipe.networks.averaging import WeightAverage, average_weights
from regpipe.networks.checkpoint import (
    Checkpoint,
    infer_config,
    is_conditional_file,
    load_weights,
    network_from_file,
    network_state,
    read_checkpoint,
    restore_network_state,
    save_network_state,
    save_weights,
    saved_config,
)
from regpipe.networks.condition import (
    CONDITION_SIZE,
    PAIR_TYPES,
    REGIONS,
    Condition,
    ConditioningConfig,
    canonical_region,
)
from regpipe.networks.conditional import ConditionalRegistrationNetwork, is_conditional
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
    "CONDITION_SIZE",
    "PAIR_TYPES",
    "REGIONS",
    "Checkpoint",
    "ComposedMap",
    "Condition",
    "ConditionalRegistrationNetwork",
    "ConditioningConfig",
    "CoordinateMap",
    "DisplacementMap",
    "Downsample",
    "FieldToMap",
    "NetworkConfig",
    "RegistrationNetwork",
    "TwoStep",
    "UNet2",
    "WeightAverage",
    "average_weights",
    "build_network",
    "canonical_region",
    "infer_config",
    "is_conditional",
    "is_conditional_file",
    "load_weights",
    "min_unet_input_size",
    "network_from_file",
    "network_state",
    "read_checkpoint",
    "restore_network_state",
    "save_network_state",
    "save_weights",
    "saved_config",
    "warp_normalised",
]
