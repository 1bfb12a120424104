"""Compile the shaspec-tf pipeline for Kubeflow Pipelines v2 / Vertex AI Pipelines.

    python pipeline/kubeflow_v2_runner.py --root gs://BUCKET/shaspec --image gcr.io/PROJECT/shaspec-tf:TAG \\
        --project PROJECT --region us-central1 --brats-input gs://BUCKET/brats2021 \\
        --avmnist-input gs://BUCKET/avmnist \\
        [--accelerator NVIDIA_TESLA_T4 --accelerator-count 1 --machine-type n1-standard-8] [--strategy mirrored] \\
        [--vertex-training] [--dataflow] --out shaspec_pipeline.json

writes the pipeline spec (JSON) that ``gcloud ai`` / the Vertex AI SDK (``aiplatform.PipelineJob(template_path=...)``)
or a Kubeflow Pipelines v2 cluster runs. The image must hold this repository installed with the ``pipeline`` extra.
The Trainer runs on the configured accelerator with the ``tf.distribute`` strategy the config names; with
``--dataflow`` the Beam components (example gens, statistics) run on Dataflow.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cloud_config(root: str, image: str, project: str, region: str, brats_input: str, avmnist_input: str,
                 accelerator: str = "NVIDIA_TESLA_T4", accelerator_count: int = 1,
                 machine_type: str = "n1-standard-8", strategy: str = "mirrored", vertex_training: bool = False,
                 dataflow: bool = False, brats_steps: int = 50000, avmnist_epochs: int = 60):
    """A ``PipelineConfig`` for the cloud: paper-size BraTS training, the paper's AV-MNIST schedule."""
    from pipeline.configs import PipelineConfig, TaskConfig, dataflow_beam_args

    beam = (dataflow_beam_args(project, region, f"{root.rstrip('/')}/tmp") if dataflow
            else ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=0"])
    tasks = [
        TaskConfig(task="brats", input_dir=brats_input, preset="paper", steps=brats_steps, batch_size=1,
                   checkpoint_every=1000, strategy=strategy, min_mean=0.5, min_worst=0.2),
        TaskConfig(task="avmnist", input_dir=avmnist_input, preset="avmnist", steps=None, epochs=avmnist_epochs,
                   strategy=strategy, min_mean=0.9, min_worst=0.5),
    ]
    return PipelineConfig(name="shaspec", root=root, tasks=tasks, metadata_path="", beam_pipeline_args=beam,
                          image=image, trainer_machine_type=machine_type, trainer_accelerator_type=accelerator,
                          trainer_accelerator_count=accelerator_count, vertex_training=vertex_training,
                          gcp_project=project, gcp_region=region)


def compile_pipeline(config, out: str) -> str:
    """Write the Kubeflow V2 / Vertex AI pipeline spec for ``config`` to ``out`` and return its path."""
    # Imported from the module: tfx.v1's re-export needs the whole kfp SDK, the compiler only kfp-pipeline-spec.
    from tfx.orchestration.kubeflow.v2.kubeflow_v2_dag_runner import KubeflowV2DagRunner, KubeflowV2DagRunnerConfig

    from pipeline.pipeline import create_pipeline

    runner = KubeflowV2DagRunner(
        config=KubeflowV2DagRunnerConfig(default_image=config.image),
        output_dir=os.path.dirname(os.path.abspath(out)), output_filename=os.path.basename(out))
    runner.run(create_pipeline(config, cloud=True))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="pipeline root, e.g. gs://BUCKET/shaspec")
    parser.add_argument("--image", required=True, help="container image with shaspec-tf[pipeline] installed")
    parser.add_argument("--project", default="")
    parser.add_argument("--region", default="us-central1")
    parser.add_argument("--brats-input", required=True, help="BraTS case folders (gs://...)")
    parser.add_argument("--avmnist-input", required=True, help="folder with mnist8k.npz and fsdd/recordings")
    parser.add_argument("--accelerator", default="NVIDIA_TESLA_T4")
    parser.add_argument("--accelerator-count", type=int, default=1)
    parser.add_argument("--machine-type", default="n1-standard-8")
    parser.add_argument("--strategy", default="mirrored", choices=("default", "mirrored", "multi_worker"))
    parser.add_argument("--vertex-training", action="store_true", help="Trainer as a Vertex AI custom job")
    parser.add_argument("--dataflow", action="store_true", help="run the Beam components on Dataflow")
    parser.add_argument("--out", default="shaspec_pipeline.json")
    args = parser.parse_args(argv)
    config = cloud_config(args.root, args.image, args.project, args.region, args.brats_input, args.avmnist_input,
                          args.accelerator, args.accelerator_count, args.machine_type, args.strategy,
                          args.vertex_training, args.dataflow)
    print(compile_pipeline(config, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
