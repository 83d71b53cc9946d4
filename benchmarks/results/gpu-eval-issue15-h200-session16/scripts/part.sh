#!/bin/bash
# Keep one GGUF part under ~ ($1: m05 or m15).
mkdir -p ~/$1 && cp .stage/cur/* ~/$1/ && ls ~/$1 | wc -l
