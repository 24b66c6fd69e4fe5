"""A model that diverges by construction: its output layer starts with NaN weights, so the loss is
NaN at the first step whatever the data, seed, backend or machine (SGD at a huge learning rate
diverged on one CI machine and only reached chance, loss finite, on another)."""

import keras
from keras import layers


def build_model(hp):
    scale = hp.Float("scale", 0.5, 1.0)
    model = keras.Sequential([
        keras.Input(shape=(32, 32, 3)),
        layers.Flatten(),
        layers.Rescaling(scale),
        layers.Dense(10, activation="softmax", kernel_initializer=keras.initializers.Constant(float("nan"))),
    ])
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"])
    return model
