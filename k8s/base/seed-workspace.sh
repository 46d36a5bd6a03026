#!/bin/sh
# Sync the pipeline definition baked into the image (/app: code, dvc.yaml, dvc.lock, params.yaml, flows/) into the
# DVC workspace volume. Files present in the image overwrite their older copies; outputs that are not in the image
# (data/, models/, reports/, .dvc/cache with its run cache) stay, so `dvc repro` redoes only what changed.
set -eu
app="${PTE_APP_DIR:-/app}"
ws="${PTE_WORKSPACE:-/workspace}"
cp -R "$app/." "$ws/"
cd "$ws"
if [ -n "${PTE_PRESET:-}" ] && [ -f "presets/${PTE_PRESET}.yaml" ]; then
  cp "presets/${PTE_PRESET}.yaml" params.yaml
  echo "seed-workspace: params.yaml <- presets/${PTE_PRESET}.yaml"
elif [ -n "${PTE_PRESET:-}" ]; then
  echo "seed-workspace: no presets/${PTE_PRESET}.yaml in the image; using its params.yaml" >&2
fi
# The image carries no .git (see .dockerignore): let DVC work without an SCM in the workspace.
if [ -d .dvc ] && [ ! -d .git ]; then
  dvc config --local core.no_scm true
fi
echo "seed-workspace: $(pwd) ready"
