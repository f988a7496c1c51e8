"""Tiny keras-hub models shared by tests (random weights, no download)."""

import keras
import keras_hub

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "good", "bad",
         "great", "awful", "fun"]


def tiny_bert_classifier(num_layers=2, seed=1, preprocessor=True):
    keras.utils.set_random_seed(seed)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    pre = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=num_layers, num_heads=2, hidden_dim=4,
        intermediate_dim=8, max_sequence_length=8,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=pre if preprocessor else None)
