from PIL import Image

from rcpp_hf.eval.answerer import LLAVA_SYSTEM_PROMPT, expand_to_square, llava_prompt


def test_llava_1_5_prompt():
    assert llava_prompt("Is there a dog in the image?\nAnswer the question using a single word or phrase.", LLAVA_SYSTEM_PROMPT) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nIs there a dog in the image?\n"
        "Answer the question using a single word or phrase. ASSISTANT:"
    )


def test_expand_to_square_pads_the_short_side_around_the_centred_image():
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 4)) == (1, 2, 3) and square.getpixel((0, 35)) == (1, 2, 3)
    assert square.getpixel((0, 5)) == (255, 0, 0) and square.getpixel((39, 34)) == (255, 0, 0)
    tall = expand_to_square(Image.new("RGB", (30, 41), (0, 255, 0)), (9, 9, 9))
    assert tall.size == (41, 41)  # 11 columns of padding: 5 left, 6 right
    assert tall.getpixel((4, 0)) == (9, 9, 9) and tall.getpixel((5, 0)) == (0, 255, 0)
    assert tall.getpixel((34, 40)) == (0, 255, 0) and tall.getpixel((35, 40)) == (9, 9, 9)
    assert expand_to_square(square, (0, 0, 0)) is square
