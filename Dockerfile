# fastloss benchmark image: CUDA + PyTorch; the default command runs the benchmark.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

WORKDIR /opt/fastloss
COPY pyproject.toml README.md ./
COPY fastloss ./fastloss
COPY kernels ./kernels
COPY bench ./bench
COPY tests ./tests
RUN python -m pip install --no-cache-dir -e ".[bench,test]"

CMD ["python", "-m", "bench", "--save", "bench/results"]
