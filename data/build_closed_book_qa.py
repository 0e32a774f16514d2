"""Build ``data/closed_book_qa.jsonl``: short-answer questions for chapter 5.

Two kinds of facts, asked with the same question templates:

* ``world``: facts of the real world written out below by hand (capitals of
  countries, capitals of US states, the country a city lies in). A small model knows
  some of them and not others; chapter 5 finds out which by probing it.
* ``invented``: made-up countries, states and cities with made-up answers, drawn from
  a seeded syllable generator. No model can know them, so they are Unknown by
  construction and check that the probe never calls a guess "known".

Every row is ``{"id", "relation", "subject", "question", "answer", "aliases", "stem",
"response", "world"}``: ``aliases`` lists other accepted spellings of the answer
(``Kiev`` for ``Kyiv``); ``response`` is the answer as a sentence (the fine-tuning
target) and ``stem`` is that sentence up to the answer ("The capital of France is").

Run ``python data/build_closed_book_qa.py`` to write the file again; the output is
the same on every run (the generator is seeded).
"""

from __future__ import annotations

import random

OUTPUT = "closed_book_qa.jsonl"
SEED = 2405  # arXiv 2405.05904, the paper chapter 5 follows
N_INVENTED = {"country_capital": 50, "city_country": 10}

TEMPLATES = {
    "country_capital": "What is the capital of {subject}?",
    "state_capital": "What is the capital of {subject}?",
    "city_country": "In which country is the city of {subject}?",
}
# The answer sentence starts with a stem that repeats the question; the answer ends it.
# The probe hands the model the stem and reads what it writes next (a cloze), so a
# model that would otherwise talk around the question must name an answer.
STEMS = {
    "country_capital": "The capital of {subject} is",
    "state_capital": "The capital of {subject} is",
    "city_country": "{subject} is in",
}

# (country, capital, aliases). Left out: countries whose capital is disputed, split between
# cities or recently moved (Benin, Bolivia, Burundi, Côte d'Ivoire, Israel, Malaysia, Myanmar,
# the Netherlands, South Africa, Sri Lanka, Tanzania, Yemen);
# countries whose capital contains the country's name (Andorra, Guatemala, Kuwait, Mexico,
# Panama: an echo of the question would count as right); and Georgia, also a US state whose
# capital, Atlanta, is a right answer to the same question.
COUNTRY_CAPITALS = [
    ("Afghanistan", "Kabul", []), ("Albania", "Tirana", ["Tirane"]), ("Algeria", "Algiers", []),
    ("Angola", "Luanda", []), ("Argentina", "Buenos Aires", []),
    ("Armenia", "Yerevan", []), ("Australia", "Canberra", []), ("Austria", "Vienna", ["Wien"]),
    ("Azerbaijan", "Baku", []), ("Bahrain", "Manama", []), ("Bangladesh", "Dhaka", ["Dacca"]),
    ("Belarus", "Minsk", []), ("Belgium", "Brussels", []), ("Belize", "Belmopan", []),
    ("Bhutan", "Thimphu", []), ("Botswana", "Gaborone", []),
    ("Brazil", "Brasília", ["Brasilia"]), ("Bulgaria", "Sofia", []), ("Burkina Faso", "Ouagadougou", []),
    ("Cambodia", "Phnom Penh", []), ("Cameroon", "Yaoundé", ["Yaounde"]),
    ("Canada", "Ottawa", []), ("Chad", "N'Djamena", ["Ndjamena"]), ("Chile", "Santiago", []),
    ("China", "Beijing", ["Peking"]), ("Colombia", "Bogotá", ["Bogota"]), ("Costa Rica", "San José", ["San Jose"]),
    ("Croatia", "Zagreb", []), ("Cuba", "Havana", []), ("Cyprus", "Nicosia", []),
    ("the Czech Republic", "Prague", ["Praha"]), ("Denmark", "Copenhagen", []), 
    ("Ecuador", "Quito", []), ("Egypt", "Cairo", []), ("El Salvador", "San Salvador", []),
    ("Eritrea", "Asmara", []), ("Estonia", "Tallinn", []), ("Ethiopia", "Addis Ababa", []),
    ("Fiji", "Suva", []), ("Finland", "Helsinki", []), ("France", "Paris", []),
    ("Gabon", "Libreville", []), ("Germany", "Berlin", []),
    ("Ghana", "Accra", []), ("Greece", "Athens", []),
    ("Guinea", "Conakry", []), ("Guyana", "Georgetown", []), ("Haiti", "Port-au-Prince", []),
    ("Honduras", "Tegucigalpa", []), ("Hungary", "Budapest", []), ("Iceland", "Reykjavik", ["Reykjavík"]),
    ("India", "New Delhi", ["Delhi"]), ("Indonesia", "Jakarta", []), ("Iran", "Tehran", ["Teheran"]),
    ("Iraq", "Baghdad", []), ("Ireland", "Dublin", []), ("Italy", "Rome", ["Roma"]),
    ("Jamaica", "Kingston", []), ("Japan", "Tokyo", []), ("Jordan", "Amman", []),
    ("Kazakhstan", "Astana", ["Nur-Sultan"]), ("Kenya", "Nairobi", []),
    ("Kyrgyzstan", "Bishkek", []), ("Laos", "Vientiane", []), ("Latvia", "Riga", []),
    ("Lebanon", "Beirut", []), ("Lesotho", "Maseru", []), ("Liberia", "Monrovia", []),
    ("Libya", "Tripoli", []), ("Lithuania", "Vilnius", []), 
    ("Madagascar", "Antananarivo", []), ("Malawi", "Lilongwe", []),
    ("Mali", "Bamako", []), ("Malta", "Valletta", []), ("Mauritania", "Nouakchott", []),
    ("Moldova", "Chisinau", ["Chișinău"]), ("Mongolia", "Ulaanbaatar", ["Ulan Bator"]),
    ("Morocco", "Rabat", []), ("Mozambique", "Maputo", []),
    ("Namibia", "Windhoek", []), ("Nepal", "Kathmandu", []),
    ("New Zealand", "Wellington", []), ("Nicaragua", "Managua", []), ("Niger", "Niamey", []),
    ("Nigeria", "Abuja", []), ("North Korea", "Pyongyang", []), ("Norway", "Oslo", []),
    ("Oman", "Muscat", []), ("Pakistan", "Islamabad", []),
    ("Paraguay", "Asunción", ["Asuncion"]), ("Peru", "Lima", []), ("the Philippines", "Manila", []),
    ("Poland", "Warsaw", ["Warszawa"]), ("Portugal", "Lisbon", ["Lisboa"]), ("Qatar", "Doha", []),
    ("Romania", "Bucharest", []), ("Russia", "Moscow", []), ("Rwanda", "Kigali", []),
    ("Saudi Arabia", "Riyadh", []), ("Senegal", "Dakar", []), ("Serbia", "Belgrade", []),
    ("Sierra Leone", "Freetown", []), ("Slovakia", "Bratislava", []),
    ("Slovenia", "Ljubljana", []), ("Somalia", "Mogadishu", []), ("South Korea", "Seoul", []),
    ("South Sudan", "Juba", []), ("Spain", "Madrid", []), ("Sudan", "Khartoum", []),
    ("Suriname", "Paramaribo", []), ("Sweden", "Stockholm", []), ("Switzerland", "Bern", ["Berne"]),
    ("Syria", "Damascus", []), ("Tajikistan", "Dushanbe", []),
    ("Thailand", "Bangkok", []), ("Togo", "Lomé", ["Lome"]), ("Tunisia", "Tunis", []),
    ("Turkey", "Ankara", []), ("Turkmenistan", "Ashgabat", ["Ashkhabad"]), ("Uganda", "Kampala", []),
    ("Ukraine", "Kyiv", ["Kiev"]), ("the United Arab Emirates", "Abu Dhabi", []),
    ("the United Kingdom", "London", []),
    ("the United States", "Washington, D.C.", ["Washington DC", "Washington"]),
    ("Uruguay", "Montevideo", []), ("Uzbekistan", "Tashkent", []), ("Venezuela", "Caracas", []),
    ("Vietnam", "Hanoi", []), ("Zambia", "Lusaka", []),
    ("Zimbabwe", "Harare", []),
]

# US states, asked without the word "state"; Georgia and Washington are left out (they are
# also a country and a city), and Oklahoma, whose capital's name holds the state's.
STATE_CAPITALS = [
    ("Alabama", "Montgomery"), ("Alaska", "Juneau"), ("Arizona", "Phoenix"), ("Arkansas", "Little Rock"),
    ("California", "Sacramento"), ("Colorado", "Denver"), ("Connecticut", "Hartford"), ("Delaware", "Dover"),
    ("Florida", "Tallahassee"), ("Hawaii", "Honolulu"), ("Idaho", "Boise"),
    ("Illinois", "Springfield"), ("Indiana", "Indianapolis"), ("Iowa", "Des Moines"), ("Kansas", "Topeka"),
    ("Kentucky", "Frankfort"), ("Louisiana", "Baton Rouge"), ("Maine", "Augusta"), ("Maryland", "Annapolis"),
    ("Massachusetts", "Boston"), ("Michigan", "Lansing"), ("Minnesota", "Saint Paul"), ("Mississippi", "Jackson"),
    ("Missouri", "Jefferson City"), ("Montana", "Helena"), ("Nebraska", "Lincoln"), ("Nevada", "Carson City"),
    ("New Hampshire", "Concord"), ("New Jersey", "Trenton"), ("New Mexico", "Santa Fe"), ("New York", "Albany"),
    ("North Carolina", "Raleigh"), ("North Dakota", "Bismarck"), ("Ohio", "Columbus"),
    ("Oregon", "Salem"), ("Pennsylvania", "Harrisburg"), ("Rhode Island", "Providence"),
    ("South Carolina", "Columbia"), ("South Dakota", "Pierre"), ("Tennessee", "Nashville"), ("Texas", "Austin"),
    ("Utah", "Salt Lake City"), ("Vermont", "Montpelier"), ("Virginia", "Richmond"),
    ("West Virginia", "Charleston"), ("Wisconsin", "Madison"), ("Wyoming", "Cheyenne"),
]
STATE_ALIASES = {"Saint Paul": ["St. Paul", "St Paul"]}

# Aliases of a country, short names included: llmbook.hallucination.is_correct reads "US" only
# in capitals (not the "us" of "let us"), and "America" or "Korea" not inside a longer name
# ("South America", "North Korea"); tests/test_hallucination.py checks that no alias is found
# inside another row's answer or a common wrong answer.
_USA = ["United States", "USA", "United States of America", "US", "U.S.", "U.S.A.", "America"]
_UK = ["the United Kingdom", "UK", "United Kingdom", "Britain", "Great Britain"]

# (city, country, aliases of the country). Cities that are not a capital of their country
# (CAPITALS_ELSEWHERE: Cape Town is one of South Africa's three), and none whose name is also a
# well-known city elsewhere (AMBIGUOUS_CITIES). tests/test_hallucination.py checks both rules on
# every row.
CITY_COUNTRIES = [
    ("Marrakesh", "Morocco", []), ("Casablanca", "Morocco", []),
    ("Mombasa", "Kenya", []), ("Johannesburg", "South Africa", []),
    ("Durban", "South Africa", []), ("Zanzibar City", "Tanzania", []), ("Timbuktu", "Mali", []),
    ("Osaka", "Japan", []), ("Kyoto", "Japan", []), ("Shanghai", "China", []), ("Chengdu", "China", []),
    ("Busan", "South Korea", ["Republic of Korea", "Korea"]), ("Mumbai", "India", []), ("Kolkata", "India", []),
    ("Bangalore", "India", []), ("Karachi", "Pakistan", []), ("Lahore", "Pakistan", []),
    ("Ho Chi Minh City", "Vietnam", ["Viet Nam"]), ("Chiang Mai", "Thailand", []), ("Cebu", "the Philippines", ["Philippines"]),
    ("Surabaya", "Indonesia", []), ("Istanbul", "Turkey", ["Türkiye"]), ("Isfahan", "Iran", []),
    ("Dubai", "the United Arab Emirates", ["UAE", "United Arab Emirates"]), ("Jeddah", "Saudi Arabia", []),
    ("Almaty", "Kazakhstan", []), ("Samarkand", "Uzbekistan", []),
    ("Novosibirsk", "Russia", []), ("Munich", "Germany", []), ("Hamburg", "Germany", []), ("Marseille", "France", []),
    ("Lyon", "France", []), ("Barcelona", "Spain", []), ("Seville", "Spain", []), ("Porto", "Portugal", []),
    ("Milan", "Italy", []), ("Florence", "Italy", []), ("Rotterdam", "the Netherlands", ["Netherlands", "Holland"]),
    ("Antwerp", "Belgium", []), ("Zurich", "Switzerland", []), ("Geneva", "Switzerland", []),
    ("Krakow", "Poland", []), ("Gothenburg", "Sweden", []), ("Bergen", "Norway", []),
    ("Edinburgh", "Scotland", _UK), ("Cork", "Ireland", []),
    ("Toronto", "Canada", []), ("Chicago", "the United States", _USA),
    ("Medellín", "Colombia", []), ("São Paulo", "Brazil", []),
    ("Rio de Janeiro", "Brazil", []), ("Valparaíso", "Chile", []),
    ("Cusco", "Peru", []),
    ("Auckland", "New Zealand", []),
    ("Yokohama", "Japan", []), ("Sapporo", "Japan", []), ("Hiroshima", "Japan", []), ("Nagoya", "Japan", []),
    ("Guangzhou", "China", []), ("Shenzhen", "China", []), ("Wuhan", "China", []), ("Hangzhou", "China", []),
    ("Chennai", "India", []), ("Pune", "India", []), ("Jaipur", "India", []), ("Ahmedabad", "India", []),
    ("Frankfurt", "Germany", []), ("Cologne", "Germany", []), ("Stuttgart", "Germany", []),
    ("Dresden", "Germany", []), ("Toulouse", "France", []), ("Bordeaux", "France", []),
    ("Venice", "Italy", []), ("Turin", "Italy", []), ("Bologna", "Italy", []), ("Bilbao", "Spain", []),
    ("Malaga", "Spain", []), ("Liverpool", "England", _UK), ("Glasgow", "Scotland", _UK),
    ("Los Angeles", "the United States", _USA), ("San Francisco", "the United States", _USA),
    ("Seattle", "the United States", _USA), ("Miami", "the United States", _USA),
    ("Montreal", "Canada", []), ("Calgary", "Canada", []), ("Brisbane", "Australia", []),
    ("Recife", "Brazil", []), ("Kazan", "Russia", []), ("Vladivostok", "Russia", []),
    ("Izmir", "Turkey", ["Türkiye"]), ("Antalya", "Turkey", ["Türkiye"]), ("Luxor", "Egypt", []),
    ("Fez", "Morocco", []), ("Utrecht", "the Netherlands", ["Netherlands", "Holland"]),
    ("Bruges", "Belgium", []), ("Basel", "Switzerland", []), ("Salzburg", "Austria", []),
    ("Gdansk", "Poland", []), ("Brno", "the Czech Republic", ["Czech Republic", "Czechia"]),
    ("Phuket", "Thailand", []), ("Peshawar", "Pakistan", []), ("Tel Aviv", "Israel", []),
    ("Monterrey", "Mexico", []), ("Cancun", "Mexico", []),
]

# Cities that are a capital of their country beside (or instead of) the one asked for above:
# no "In which country is ..." question may be about one.
CAPITALS_ELSEWHERE = {"Cape Town", "Pretoria", "Bloemfontein", "The Hague", "Amsterdam", "Putrajaya",
                      "Kuala Lumpur", "Naypyidaw", "Yangon", "Sucre", "La Paz", "Porto-Novo", "Cotonou",
                      "Yamoussoukro", "Abidjan", "Dodoma", "Dar es Salaam", "Gitega", "Bujumbura", "Jerusalem",
                      "Sri Jayawardenepura Kotte", "Colombo", "Sanaa", "Aden"}
# Cities whose name is also a well-known city (or state capital) in another country: the
# question "In which country is the city of X?" would have two right answers.
AMBIGUOUS_CITIES = {"Alexandria", "Córdoba", "Perth", "Valencia", "Hyderabad", "Birmingham", "Sydney",
                    "Guadalajara", "Saint Petersburg", "Naples", "Lagos", "Manchester", "Melbourne", "Vancouver",
                    "London", "Santiago", "San José", "Kingston", "Georgetown", "Victoria", "Tripoli"}

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "st",
           "t", "tr", "v", "vr", "z", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "nd", "sk", "m", "x"]
_COUNTRY_ENDINGS = ["ia", "ar", "istan", "onia", "esh", "and", "ora", "ivia"]
_CITY_ENDINGS = ["", "ar", "eth", "grad", "holm", "ovo", "ane", "port", "ville", "mir", "dun", "is"]


def invented_name(rng: random.Random, syllables: int, ending: str = "") -> str:
    """A pronounceable made-up name: ``syllables`` onset-vowel-coda syllables plus ``ending``."""
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return ("".join(parts) + ending).capitalize()


def _row(relation: str, subject: str, answer: str, aliases: list[str], world: str) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in subject.lower()).strip("-")
    stem = STEMS[relation].format(subject=subject)
    stem = stem[0].upper() + stem[1:]
    return {
        "id": f"{world}-{relation}-{slug}",
        "relation": relation,
        "subject": subject,
        "question": TEMPLATES[relation].format(subject=subject),
        "answer": answer,
        "aliases": list(aliases),
        "stem": stem,
        "response": f"{stem} {answer}" + ("" if answer.endswith(".") else "."),
        "world": world,
    }


def world_rows() -> list[dict]:
    """The real-world facts, in a fixed order."""
    rows = [_row("country_capital", c, a, al, "world") for c, a, al in COUNTRY_CAPITALS]
    rows += [_row("state_capital", s, a, STATE_ALIASES.get(a, []), "world") for s, a in STATE_CAPITALS]
    rows += [_row("city_country", c, a, al, "world") for c, a, al in CITY_COUNTRIES]
    return rows


def invented_rows(seed: int = SEED, counts: dict[str, int] | None = None) -> list[dict]:
    """Made-up subjects with made-up answers; no name collides with a real one or another."""
    counts = N_INVENTED if counts is None else counts
    unknown = set(counts) - set(TEMPLATES)
    if unknown:
        raise ValueError(f"counts names unknown relations {sorted(unknown)}; allowed: {sorted(TEMPLATES)}")
    if any(not isinstance(n, int) or n < 0 for n in counts.values()):
        raise ValueError(f"counts must be integers >= 0, got {counts}")
    rng = random.Random(seed)
    taken = {w.lower() for row in world_rows() for w in (row["subject"], row["answer"], *row["aliases"])}
    real_countries = sorted({c for c, _, _ in COUNTRY_CAPITALS if not c.startswith("the ")})

    def fresh(make) -> str:
        while True:
            name = make()
            if name.lower() not in taken and 5 <= len(name) <= 14:
                taken.add(name.lower())
                return name

    rows = []
    for _ in range(counts.get("country_capital", 0)):
        country = fresh(lambda: invented_name(rng, rng.choice([1, 2]), rng.choice(_COUNTRY_ENDINGS)))
        capital = fresh(lambda: invented_name(rng, 2, rng.choice(_CITY_ENDINGS)))
        rows.append(_row("country_capital", country, capital, [], "invented"))
    for _ in range(counts.get("state_capital", 0)):
        state = fresh(lambda: invented_name(rng, rng.choice([2, 3]), rng.choice(["a", "ia", "o", ""])))
        capital = fresh(lambda: invented_name(rng, 2, rng.choice(_CITY_ENDINGS)))
        rows.append(_row("state_capital", state, capital, [], "invented"))
    for _ in range(counts.get("city_country", 0)):
        city = fresh(lambda: invented_name(rng, 2, rng.choice(_CITY_ENDINGS)))
        # The answer is a real country, so a guess can be right by chance (about 1 in 100).
        rows.append(_row("city_country", city, rng.choice(real_countries), [], "invented"))
    return rows


def build(seed: int = SEED) -> list[dict]:
    """Every row: the real-world facts, then the invented ones."""
    rows = world_rows() + invented_rows(seed)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise RuntimeError("duplicate ids: two subjects share a slug")
    return rows


if __name__ == "__main__":  # data/build.py writes the file
    from build import main

    main([__file__])
