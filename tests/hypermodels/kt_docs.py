"""Hypermodels as KerasTuner's documentation writes them, unchanged but for the input shape
(CIFAR-10 instead of MNIST): cifar_exp must run them as they are."""

import keras
import keras_tuner
from keras import layers


# KerasTuner "Getting started": define the search space.
def build_model(hp):
    model = keras.Sequential()
    model.add(layers.Flatten())
    # Tune the number of layers.
    for i in range(hp.Int("num_layers", 1, 3)):
        model.add(
            layers.Dense(
                # Tune number of units separately.
                units=hp.Int(f"units_{i}", min_value=32, max_value=512, step=32),
                activation=hp.Choice("activation", ["relu", "tanh"]),
            )
        )
    if hp.Boolean("dropout"):
        model.add(layers.Dropout(rate=0.25))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


# KerasTuner's HyperParameters.conditional_scope docstring, compiled, and "Tune model training"
# (a HyperModel whose fit tunes the batch size).
class MyHyperModel(keras_tuner.HyperModel):
    def build(self, hp):
        model = keras.Sequential()
        model.add(keras.Input(shape=(32, 32, 3)))
        model_type = hp.Choice("model_type", ["mlp", "cnn"])
        with hp.conditional_scope("model_type", ["mlp"]):
            if model_type == "mlp":
                model.add(layers.Flatten())
                model.add(layers.Dense(hp.Int("mlp_units", 16, 64, step=16), activation="relu"))
        with hp.conditional_scope("model_type", ["cnn"]):
            if model_type == "cnn":
                model.add(layers.Conv2D(hp.Choice("filters", [8, 16]), 3, activation="relu"))
                model.add(layers.GlobalAveragePooling2D())
        model.add(layers.Dense(10, activation="softmax"))
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, **kwargs):
        return model.fit(*args, batch_size=hp.Choice("batch_size", [16, 32]), **kwargs)
