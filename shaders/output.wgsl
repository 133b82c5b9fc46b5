// Output stages of an adaptation step: LAME and the label-shift corrections (filled in by the output-stage work).
