"""Keras 3 layers of ShaSpec (backend-agnostic: ``keras`` and ``keras.ops`` only)."""
from shaspec_tf.layers.aspp import ASPP3D
from shaspec_tf.layers.conv import Conv3DUnit, SymmetricPadding3D, WSConv2D, WSConv3D, standardize_kernel
from shaspec_tf.layers.decoder import Decoder3D
from shaspec_tf.layers.encoder import Encoder3D
from shaspec_tf.layers.encoder2d import ConvTrunk2D, ModalityStem2D
from shaspec_tf.layers.fusion import (DomainClassifier, FoldModalities, MaskModalities, MergeModalityBatch,
                                      MissingFeatureGenerator, ModalitiesToChannels, ResidualFusion,
                                      StackModalities, UnfoldModalities)
from shaspec_tf.layers.norm import InstanceNormalization, make_activation, make_norm
from shaspec_tf.layers.resample import LinearUpsampling3D, upsample_linear_x2
from shaspec_tf.layers.resnet import ConvNormAct, ResidualBlock3D, ResNet3D, channels_shape

__all__ = [
    "ASPP3D", "Conv3DUnit", "ConvNormAct", "ConvTrunk2D", "ModalityStem2D", "Decoder3D", "DomainClassifier", "Encoder3D", "FoldModalities",
    "InstanceNormalization", "LinearUpsampling3D", "MaskModalities", "MergeModalityBatch", "MissingFeatureGenerator",
    "ModalitiesToChannels", "ResNet3D", "StackModalities",
    "ResidualBlock3D", "ResidualFusion", "SymmetricPadding3D", "UnfoldModalities", "WSConv2D", "WSConv3D",
    "channels_shape", "make_activation", "make_norm", "standardize_kernel", "upsample_linear_x2",
]
