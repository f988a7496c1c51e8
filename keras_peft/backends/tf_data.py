"""The private tf.data API keras-peft uses: the graph of a `tf.data.Dataset` pipeline.

`keras_peft.cache_prefix` refuses a pipeline that draws random numbers
(random augmentation in a `map`), so it reads the ops the pipeline runs.
tf.data has no public way to do that; if a TensorFlow release moves it, this
is the only module to change.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["pipeline_graph"]


def pipeline_graph(dataset: tf.data.Dataset):
    """The `tf.compat.v1.GraphDef` of a dataset's pipeline (its functions in `library`).

    Raises whatever tf.data raises for a pipeline it cannot serialize.
    """
    graph = tf.compat.v1.GraphDef()
    # `DatasetV2._as_serialized_graph`: the only way tf.data gives the pipeline's ops.
    graph.ParseFromString(dataset._as_serialized_graph().numpy())
    return graph
