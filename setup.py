from setuptools import find_packages, setup

# `a1-jax evaluate`'s identity metric: dlib's face-recognition ResNet, prebuilt (dlib-bin: no compiler needed) with its
# public-domain weights; pinned to the versions the identity figures in BUILD_NOTES were measured with.
EVAL = [
    "dlib-bin==20.0.1.post1",
    "face-recognition-models==0.3.0",
    "matplotlib>=3.7",  # --plot
]

# `--text`: eSpeak NG (GPL-3.0) as a wheel that carries the library and its voices (no system package); we call it
# through ctypes. Optional: speech from text is the only thing that needs it.
TTS = ["espeakng-loader==0.2.4"]

# `a1-jax app`: the web app. Pinned: the app leans on Gradio's queue, cancel, progress and upload-cache behaviour,
# which moves between releases; this is the version its browser test passed on.
APP = ["gradio==6.31.0"]

setup(
    name="a1_jax",
    version="0.1.0",
    description="SkyReels-A1 portrait animation in JAX/Flax: inference with PyTorch parity, and training",
    packages=find_packages(include=["a1_jax", "a1_jax.*"]),
    # MediaPipe's face landmarker (Apache-2.0, 3.7 MB): a fresh install animates with no download. The face rig
    # (blendshapes -> landmark offsets, 0.3 MB) is ours, fitted by tools/fit_face_rig.py. The example portrait and
    # driving clip (public domain, ~380 KB; examples/LICENSES.md): `a1-jax animate --example`.
    package_data={"a1_jax": ["assets/face_landmarker.task", "assets/face_rig.npz", "examples/portrait.png",
                             "examples/driving.mp4", "examples/LICENSES.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",  # no upper bound: GPU machines bring newer jax
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array-record",  # training-data shards (`a1-jax make-dataset` writes them; grain and TFDS read them)
        "protobuf",  # training-data records are tf.train.Example protos (built without TensorFlow)
        "mediapipe>=1.2,<1.3",  # the Tasks API we use; 1.2 has no legacy `solutions`
        "opencv-contrib-python",  # the only OpenCV wheel: mediapipe needs it, a second one shares cv2/ and breaks it
        "imageio",
        "imageio-ffmpeg",
        "pillow",  # resizes exactly as the reference's PIL calls (canvas crop, SigLIP preprocessing)
        "safetensors",
        "numpy",
        "ml_dtypes",
        "tqdm",
        "pyyaml",  # training configs (configs/train/*.yaml)
        # `--audio`: offline phone recognition and forced alignment with the en-us model the wheel ships (BSD,
        # 29 MB wheel, no download at run time). 5.x: the Decoder API (all-phone search, set_align_text) we use.
        "pocketsphinx>=5.0,<6",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",  # the suite runs on 2 workers (README: Test)
            "torch==2.13.0",  # the local CPU wheel; any other spec pulls GBs of CUDA packages
            "diffusers==0.42.1",  # the parity reference: pinned to the version our parity figures were measured on
            "transformers==5.23.0",
            "tensorflow-datasets",
            *EVAL,  # the evaluate tests measure identity too
            *TTS,  # and the text-to-speech tests speak
            *APP,  # the web app's tests: through its API (gradio_client) and in a real browser (Selenium)
            "gradio_client==2.7.2",  # the version gradio 6.31.0 ships with
            "selenium==4.51.0",  # drives Debian's chromium through its chromedriver (no Selenium Manager download)
        ],
        "eval": EVAL,
        "tts": TTS,
        "app": APP,
    },
    entry_points={"console_scripts": ["a1-jax=a1_jax.cli:main"]},
)
