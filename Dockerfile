# fastloss benchmark image: CUDA + PyTorch; the default command runs the benchmark.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

# Triton compiles a small C launcher on first use: the runtime image has no C compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fastloss
COPY pyproject.toml README.md ./
COPY fastloss ./fastloss
COPY kernels ./kernels
COPY bench ./bench
COPY tests ./tests
RUN python -m pip install --no-cache-dir -e ".[bench,test]"

CMD ["python", "-m", "bench", "--save", "bench/results"]
