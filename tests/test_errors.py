"""kiln.errors: the one-line messages users read."""

from kiln.errors import StepError


def test_a_step_error_raised_again_for_its_own_step_names_the_step_once():
    # a child process reports "<step>: <problem>"; the parent raises it again for the same step
    again = StepError("m/t/convert", str(StepError("m/t/convert", "the converter failed")))
    assert str(again) == "m/t/convert: the converter failed" and again.problem == "the converter failed"


def test_another_steps_name_in_the_problem_is_kept():
    assert str(StepError("m/t/convert", "source: the factory raised")) == "m/t/convert: source: the factory raised"
