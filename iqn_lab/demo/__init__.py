"""The end-to-end demo: lab, ISP agent, browser, end-user agent, stalls on a
timetable, report."""
