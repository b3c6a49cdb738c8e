@echo off
rem One click for Windows: create installer_files\env, install the pinned requirements for this
rem machine (CUDA when nvidia-smi sees a GPU, else CPU) once, then start the web UI.
rem server.py reads CMD_FLAGS.txt itself; arguments given here come after those flags and win.
setlocal enabledelayedexpansion
cd /d "%~dp0"

set ENV_DIR=installer_files\env
set PY=%ENV_DIR%\Scripts\python.exe
set LLAMA_CPP_VERSION=0.3.36

if not exist "%PY%" (
  where python >nul 2>nul || (echo Python 3.10 or newer is needed: https://www.python.org/downloads/ & exit /b 1)
  python -c "import sys; sys.exit(sys.version_info < (3, 10))" || (echo Python 3.10 or newer is needed. & exit /b 1)
  echo Creating the virtual environment in %ENV_DIR%
  python -m venv "%ENV_DIR%" || exit /b 1
)

set KIND=cpu
nvidia-smi -L >nul 2>nul && set KIND=cuda

rem The stamp is the requirements files as installed; unchanged files skip the install.
set STAMP=%ENV_DIR%\installed-%KIND%.txt
copy /b requirements.txt + requirements-cuda.txt + requirements-gptq.txt + scripts\install_llama_cpp.sh "%TEMP%\wb-req.txt" >nul
fc /b "%TEMP%\wb-req.txt" "%STAMP%" >nul 2>nul
if errorlevel 1 (
  echo Installing requirements for a %KIND% machine ^(once; later starts skip this^)
  "%PY%" -m pip install --upgrade "pip>=23.2" || exit /b 1
  if "%KIND%"=="cuda" (
    rem PyPI's Windows torch is CPU-only; the CUDA build comes from PyTorch's own index.
    "%PY%" -m pip install --extra-index-url https://download.pytorch.org/whl/cu130 -r requirements.txt -r requirements-cuda.txt -r requirements-gptq.txt || exit /b 1
    set CMAKE_ARGS=-DGGML_CUDA=ON
  ) else (
    "%PY%" -m pip install -r requirements.txt || exit /b 1
    set CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  )
  rem llama-cpp-python compiles from source: Visual Studio Build Tools (C++) and CMake are needed.
  "%PY%" -m pip install --no-deps --force-reinstall --no-binary llama-cpp-python llama-cpp-python==%LLAMA_CPP_VERSION% || (
    echo Building llama-cpp-python failed: install "Visual Studio Build Tools" with C++ and run this again.
    exit /b 1
  )
  copy /y "%TEMP%\wb-req.txt" "%STAMP%" >nul
)

rem The packages of the extensions settings.yaml / CMD_FLAGS.txt / these arguments enable (once each).
"%PY%" scripts\install_extensions.py --enabled %* || echo Some extensions' packages did not install: those extensions stay disabled.
"%PY%" server.py %*
