import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load("diffusers-cir/genecis")
launch_gradio_widget(module)
